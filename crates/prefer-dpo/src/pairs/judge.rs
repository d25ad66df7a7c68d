//! Judges that score sampled responses: built-in rules, or an external command that reads one JSON
//! line per response on stdin and prints one score per line.

use std::{
    fmt,
    io::Write,
    process::{Command, Stdio},
    str::FromStr,
};

use serde_json::{Value, json};

/// How a response is scored (higher is better).
#[derive(Debug, Clone)]
pub enum Judge {
    /// `length`: the response's length in characters.
    Length,
    /// `regex:PATTERN`: the number of non-overlapping matches of the pattern in the response.
    Regex(regex::Regex),
    /// `contains:TEXT`: 1 when the response contains the text, else 0.
    Contains(String),
    /// `exact`: 1 when the response equals the prompt row's `reference` answer (surrounding
    /// whitespace aside), else 0.
    Exact,
    /// `command:CMD`: `sh -c CMD` reads `{"prompt", "response", "reference"}` JSON lines on stdin
    /// and prints one number per line, in order.
    Command(String),
}

impl FromStr for Judge {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, arg) = s.split_once(':').unwrap_or((s, ""));
        match (kind, arg) {
            ("length", "") => Ok(Self::Length),
            ("exact", "") => Ok(Self::Exact),
            ("regex", p) if !p.is_empty() => regex::Regex::new(p)
                .map(Self::Regex)
                .map_err(|e| format!("regex:{p}: {e}")),
            ("contains", t) if !t.is_empty() => Ok(Self::Contains(t.to_string())),
            ("command", c) if !c.trim().is_empty() => Ok(Self::Command(c.to_string())),
            _ => Err(format!(
                "unknown judge `{s}` (valid: length, exact, regex:PATTERN, contains:TEXT, \
                 command:CMD)"
            )),
        }
    }
}

impl fmt::Display for Judge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Length => f.write_str("length"),
            Self::Regex(r) => write!(f, "regex:{}", r.as_str()),
            Self::Contains(t) => write!(f, "contains:{t}"),
            Self::Exact => f.write_str("exact"),
            Self::Command(c) => write!(f, "command:{c}"),
        }
    }
}

/// One response to score, with its prompt and the prompt row's reference answer.
#[derive(Debug, Clone, PartialEq)]
pub struct JudgeInput {
    /// The prompt as the input had it.
    pub prompt: Value,
    /// The sampled response.
    pub response: String,
    /// The reference answer of the prompt's row, if it has one.
    pub reference: Option<String>,
}

/// Why responses could not be scored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("judge `{judge}`: {message}")]
pub struct JudgeError {
    /// The judge, as given.
    pub judge: String,
    /// What went wrong, naming the response or the output line.
    pub message: String,
}

impl Judge {
    /// One score per input, in order.
    pub fn score(&self, inputs: &[JudgeInput]) -> Result<Vec<f64>, JudgeError> {
        let fail = |message: String| JudgeError {
            judge: self.to_string(),
            message,
        };
        match self {
            Self::Length => Ok(inputs
                .iter()
                .map(|i| i.response.chars().count() as f64)
                .collect()),
            Self::Regex(r) => Ok(inputs
                .iter()
                .map(|i| r.find_iter(&i.response).count() as f64)
                .collect()),
            Self::Contains(t) => Ok(inputs
                .iter()
                .map(|i| f64::from(u8::from(i.response.contains(t.as_str()))))
                .collect()),
            Self::Exact => inputs
                .iter()
                .enumerate()
                .map(|(n, i)| match &i.reference {
                    Some(r) => Ok(f64::from(u8::from(i.response.trim() == r.trim()))),
                    None => Err(fail(format!(
                        "response {} has no reference answer: its prompt row needs a \
                         `reference` string",
                        n + 1
                    ))),
                })
                .collect(),
            Self::Command(c) => run_command(c, inputs).map_err(fail),
        }
    }
}

/// Runs `sh -c command` with one JSON line per input on stdin; its stdout must hold one finite
/// number per input, one per line.
fn run_command(command: &str, inputs: &[JudgeInput]) -> Result<Vec<f64>, String> {
    let mut stdin_text = String::new();
    for i in inputs {
        let line = json!({"prompt": i.prompt, "response": i.response, "reference": i.reference});
        stdin_text.push_str(&line.to_string());
        stdin_text.push('\n');
    }
    let mut child = Command::new("sh")
        .args(["-c", command])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not start `sh`: {e}"))?;
    // Written from another thread: a judge that prints before reading all its input cannot block
    // on a full stdout pipe while we block on a full stdin pipe.
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let writer = std::thread::spawn(move || stdin.write_all(stdin_text.as_bytes()));
    let output = child
        .wait_with_output()
        .map_err(|e| format!("could not wait for it: {e}"))?;
    // A judge that exits without reading all its input breaks the pipe; its exit status and
    // output say more than that.
    let _ = writer.join();
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!(
            "exited with {}: {}",
            output.status,
            stderr.trim().lines().last().unwrap_or("(no message)")
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    if lines.len() != inputs.len() {
        return Err(format!(
            "printed {} lines for {} responses: one score per line, in order",
            lines.len(),
            inputs.len()
        ));
    }
    lines
        .iter()
        .enumerate()
        .map(|(n, line)| match line.trim().parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(v),
            _ => Err(format!(
                "output line {}: `{}` is not a finite number",
                n + 1,
                line.trim()
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(responses: &[&str]) -> Vec<JudgeInput> {
        responses
            .iter()
            .map(|r| JudgeInput {
                prompt: json!("Q?"),
                response: r.to_string(),
                reference: Some("yes".into()),
            })
            .collect()
    }

    #[test]
    fn built_in_rules_score_each_response() {
        let x = inputs(&["yes", "no no", " yes "]);
        let score = |j: &str| j.parse::<Judge>().unwrap().score(&x).unwrap();
        assert_eq!(score("length"), [3.0, 5.0, 5.0]);
        assert_eq!(score("regex:no"), [0.0, 2.0, 0.0]);
        assert_eq!(score("contains:yes"), [1.0, 0.0, 1.0]);
        assert_eq!(score("exact"), [1.0, 0.0, 1.0]);
        let mut missing = x.clone();
        missing[1].reference = None;
        let err = Judge::Exact.score(&missing).unwrap_err().to_string();
        assert!(
            err.contains("response 2") && err.contains("reference"),
            "{err}"
        );
    }

    #[test]
    fn unknown_judges_and_bad_patterns_are_named() {
        for (spec, says) in [
            ("loudness", "unknown judge `loudness`"),
            ("regex:(", "regex:("),
            ("contains:", "unknown judge"),
        ] {
            let err = spec.parse::<Judge>().unwrap_err();
            assert!(err.contains(says), "{spec}: {err}");
        }
    }

    #[test]
    fn a_command_reads_json_lines_and_prints_one_score_per_line() {
        let x = inputs(&["a", "bbb"]);
        // The score is the length of each input line's JSON text.
        let judge: Judge = "command:while read -r l; do echo ${#l}; done"
            .parse()
            .unwrap();
        let scores = judge.score(&x).unwrap();
        let want: Vec<f64> = x
            .iter()
            .map(|i| {
                json!({"prompt": i.prompt, "response": i.response, "reference": i.reference})
                    .to_string()
                    .len() as f64
            })
            .collect();
        assert_eq!(scores, want);
        for (cmd, says) in [
            ("command:echo 1", "printed 1 lines for 2 responses"),
            ("command:printf '1\\nhigh\\n'", "output line 2: `high`"),
            ("command:echo oops >&2; exit 3", "oops"),
        ] {
            let err = cmd.parse::<Judge>().unwrap().score(&x).unwrap_err();
            assert!(err.to_string().contains(says), "{cmd}: {err}");
        }
    }
}
