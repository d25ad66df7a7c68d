//! Pairs from scored responses: rows `{prompt, response, score}` grouped by prompt, responses
//! ranked by score, the best paired with the worst, the second best with the second worst, and so
//! on (each response in at most one pair), keeping pairs whose scores differ by at least a margin.

use std::collections::HashMap;

use serde_json::Value;

use super::{InputRow, MadePair, completion, object, prompt_of, required};
use crate::data::BadRow;

/// What became of the input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScoredReport {
    /// Input rows read.
    pub rows: usize,
    /// Distinct prompts.
    pub prompts: usize,
    /// Pairs written.
    pub pairs: usize,
    /// Candidate pairs dropped because both scores were equal.
    pub ties: usize,
    /// Candidate pairs dropped because the scores differed by less than the margin (ties apart).
    pub below_min_diff: usize,
    /// Prompts with a single response, which make no pair.
    pub single_responses: usize,
}

/// One response of a prompt, with the input row it came from.
struct Scored {
    response: Value,
    score: f64,
    location: String,
}

/// Pairs from `records` (every row must hold a prompt, a non-empty response and a finite numeric
/// score; the first that does not is the error), keeping those whose scores differ by at least
/// `min_score_diff`. Prompts keep the order of their first row.
pub fn pairs_from_scores(
    records: Vec<InputRow>,
    min_score_diff: f64,
) -> Result<(Vec<MadePair>, ScoredReport), BadRow> {
    let mut report = ScoredReport::default();
    let mut order: Vec<Value> = Vec::new();
    let mut groups: HashMap<String, Vec<Scored>> = HashMap::new();
    for (location, parsed) in records {
        let value = parsed.map_err(|reason| BadRow {
            location: location.clone(),
            reason,
        })?;
        let row = object(&location, &value)?;
        let prompt = prompt_of(&location, row)?;
        let response = response_of(&location, row)?;
        let score = score_of(&location, row)?;
        report.rows += 1;
        let key = prompt.to_string();
        let group = groups.entry(key).or_insert_with(|| {
            order.push(prompt.clone());
            Vec::new()
        });
        group.push(Scored {
            response,
            score,
            location,
        });
    }
    report.prompts = order.len();
    let mut pairs = Vec::new();
    for prompt in order {
        let mut group = groups.remove(&prompt.to_string()).unwrap_or_default();
        if group.len() < 2 {
            report.single_responses += 1;
            continue;
        }
        // Best first; equal scores keep their input order.
        group.sort_by(|a, b| b.score.total_cmp(&a.score));
        let n = group.len();
        for rank in 0..n / 2 {
            let (best, worst) = (&group[rank], &group[n - 1 - rank]);
            let diff = best.score - worst.score;
            if diff == 0.0 {
                report.ties += 1;
            } else if diff < min_score_diff {
                report.below_min_diff += 1;
            } else {
                pairs.push(MadePair {
                    chosen: completion(&prompt, &best.response),
                    rejected: completion(&prompt, &worst.response),
                    chosen_score: Some(best.score),
                    rejected_score: Some(worst.score),
                    metadata: serde_json::json!({
                        "source": "scored",
                        "rank": rank + 1,
                        "responses": n,
                        "chosen_row": best.location,
                        "rejected_row": worst.location,
                    }),
                    prompt: prompt.clone(),
                });
            }
        }
    }
    report.pairs = pairs.len();
    Ok((pairs, report))
}

fn response_of(location: &str, row: &serde_json::Map<String, Value>) -> Result<Value, BadRow> {
    match required(location, row, "response")? {
        Value::String(s) if !s.trim().is_empty() => Ok(Value::String(s.clone())),
        Value::Array(a) if !a.is_empty() => Ok(Value::Array(a.clone())),
        _ => Err(BadRow {
            location: location.to_string(),
            reason: "`response` must be a non-empty string or list of messages".into(),
        }),
    }
}

fn score_of(location: &str, row: &serde_json::Map<String, Value>) -> Result<f64, BadRow> {
    let bad = |reason: String| BadRow {
        location: location.to_string(),
        reason,
    };
    match required(location, row, "score")? {
        Value::Number(n) => n
            .as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| bad(format!("`score` {n} is not a finite number"))),
        other => Err(bad(format!("`score` must be a number, found {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(lines: &[&str]) -> Vec<(String, Result<Value, String>)> {
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| {
                (
                    format!("scores.jsonl:{}", i + 1),
                    serde_json::from_str(l).map_err(|e| e.to_string()),
                )
            })
            .collect()
    }

    #[test]
    fn best_pairs_with_worst_and_margins_ties_and_singles_are_counted() {
        let rows = records(&[
            r#"{"prompt": "a", "response": "r1", "score": 1.0}"#,
            r#"{"prompt": "a", "response": "r2", "score": 5.0}"#,
            r#"{"prompt": "b", "response": "only", "score": 3}"#,
            r#"{"prompt": "a", "response": "r3", "score": 3.0}"#,
            r#"{"prompt": "a", "response": "r4", "score": 3.2}"#,
            r#"{"prompt": "c", "response": "x", "score": 2}"#,
            r#"{"prompt": "c", "response": "y", "score": 2}"#,
        ]);
        let (pairs, report) = pairs_from_scores(rows, 0.5).unwrap();
        // a: 5.0 (r2) with 1.0 (r1) kept; 3.2 (r4) with 3.0 (r3) below the margin; c: a tie.
        assert_eq!(pairs.len(), 1);
        let p = &pairs[0];
        assert_eq!(
            (p.chosen.as_str(), p.rejected.as_str()),
            (Some("r2"), Some("r1"))
        );
        assert_eq!((p.chosen_score, p.rejected_score), (Some(5.0), Some(1.0)));
        assert_eq!(p.metadata["chosen_row"], "scores.jsonl:2");
        assert_eq!(
            report,
            ScoredReport {
                rows: 7,
                prompts: 3,
                pairs: 1,
                ties: 1,
                below_min_diff: 1,
                single_responses: 1,
            }
        );
        // With no margin the second pair of `a` is kept too.
        let rows = records(&[
            r#"{"prompt": "a", "response": "r1", "score": 1.0}"#,
            r#"{"prompt": "a", "response": "r2", "score": 5.0}"#,
            r#"{"prompt": "a", "response": "r3", "score": 3.0}"#,
            r#"{"prompt": "a", "response": "r4", "score": 3.2}"#,
        ]);
        let (pairs, _) = pairs_from_scores(rows, 0.0).unwrap();
        let chosen: Vec<&str> = pairs.iter().map(|p| p.chosen.as_str().unwrap()).collect();
        assert_eq!(chosen, ["r2", "r4"]);
    }

    #[test]
    fn a_conversational_prompt_gets_assistant_messages() {
        let rows = records(&[
            r#"{"prompt": [{"role": "user", "content": "hi"}], "response": "hello", "score": 1}"#,
            r#"{"prompt": [{"role": "user", "content": "hi"}], "response": "go away", "score": 0}"#,
        ]);
        let (pairs, _) = pairs_from_scores(rows, 0.5).unwrap();
        assert_eq!(
            pairs[0].chosen,
            serde_json::json!([{"role": "assistant", "content": "hello"}])
        );
    }

    #[test]
    fn bad_rows_name_the_row_and_the_key() {
        for (line, says) in [
            (r#"{"prompt": "a", "score": 1}"#, "missing key `response`"),
            (r#"{"prompt": "a", "response": "r"}"#, "missing key `score`"),
            (
                r#"{"prompt": "a", "response": "r", "score": "high"}"#,
                "`score` must be a number, found \"high\"",
            ),
            (r#"{"response": "r", "score": 1}"#, "missing key `prompt`"),
            (r#"[1, 2]"#, "a row must be a JSON object"),
            (r#"{"prompt": "a", "#, "EOF"),
        ] {
            let rows = records(&[r#"{"prompt": "a", "response": "ok", "score": 1}"#, line]);
            let err = pairs_from_scores(rows, 0.5).unwrap_err();
            assert_eq!(err.location, "scores.jsonl:2", "{line}");
            assert!(err.reason.contains(says), "{line}: {err}");
        }
    }
}
