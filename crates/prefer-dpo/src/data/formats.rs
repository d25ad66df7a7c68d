//! Reading preference files (JSON Lines, a JSON array, or Parquet) and normalising every row to a prompt with
//! a chosen and a rejected completion. Formats: TRL standard (strings), TRL conversational (message
//! lists), implicit prompt (whole conversations sharing a prefix), and ShareGPT / LLaMA-Factory.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use prefer_llama::ChatMessage;
use serde_json::{Map, Value};

use super::parquet_rows::{is_parquet, read_records};

/// A prompt or completion: plain text or chat messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Turns {
    /// Standard format.
    Text(String),
    /// Conversational format.
    Messages(Vec<ChatMessage>),
}

/// One preference pair, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferenceRow {
    /// The shared prompt.
    pub prompt: Turns,
    /// The preferred completion.
    pub chosen: Turns,
    /// The dispreferred completion.
    pub rejected: Turns,
}

/// The layout of a file's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFormat {
    /// `{"prompt": str, "chosen": str, "rejected": str}`.
    Standard,
    /// `{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`.
    Conversational,
    /// `{"chosen": .., "rejected": ..}` sharing a prompt prefix.
    Implicit,
    /// `{"conversations": [{"from", "value"}], "chosen": {"from", "value"}, "rejected": {...}}`.
    ShareGpt,
}

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Standard => "standard",
            Self::Conversational => "conversational",
            Self::Implicit => "implicit",
            Self::ShareGpt => "sharegpt",
        })
    }
}

impl std::str::FromStr for DataFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "standard" => Ok(Self::Standard),
            "conversational" => Ok(Self::Conversational),
            "implicit" => Ok(Self::Implicit),
            "sharegpt" => Ok(Self::ShareGpt),
            _ => Err(format!(
                "unknown data format `{s}` (valid: standard, conversational, implicit, sharegpt)"
            )),
        }
    }
}

/// What to do with a row that cannot be used (`on_bad_row`: `error` or `skip`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBadRow {
    /// Stop before any work, naming the row (the default).
    #[default]
    Error,
    /// Skip it and count it.
    Skip,
}

/// A row that cannot be used, with where it is and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    /// `file:line` (JSON Lines) or `file: row N` (JSON arrays and Parquet).
    pub location: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for BadRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.reason)
    }
}

impl std::error::Error for BadRow {}

/// The usable rows of a file and the ones that were not.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// Rows with their locations.
    pub rows: Vec<(String, PreferenceRow)>,
    /// Rows that could not be used.
    pub bad: Vec<BadRow>,
    /// The detected (or forced) format.
    pub format: Option<DataFormat>,
}

impl Loaded {
    /// Applies the bad-row policy: the first bad row as an error, or the rows kept.
    pub fn check(self, policy: OnBadRow) -> Result<Self, BadRow> {
        match (policy, self.bad.first()) {
            (OnBadRow::Error, Some(b)) => Err(b.clone()),
            _ => Ok(self),
        }
    }
}

/// One raw record of a file: its location and its JSON value (or why it has none).
pub(crate) type Record = (String, Result<Value, String>);

/// Reads a preference file: Parquet (by its `.parquet` extension), a JSON array (a file whose
/// first non-blank character is `[`), or JSON Lines. A UTF-8 byte-order mark and CRLF line
/// endings are accepted.
pub fn load_file(path: &Path, format: Option<DataFormat>) -> Result<Loaded, BadRow> {
    let name = path.display().to_string();
    rows_from_records(&name, file_records(path)?, format)
}

/// The raw records of a Parquet, JSON array or JSON Lines file, each with its location.
pub(crate) fn file_records(path: &Path) -> Result<Vec<Record>, BadRow> {
    let name = path.display().to_string();
    if is_parquet(path) {
        return read_records(path, &name);
    }
    let bytes = std::fs::read(path).map_err(|e| BadRow {
        location: name.clone(),
        reason: e.to_string(),
    })?;
    json_records(&name, &bytes)
}

/// Reads the files of one dataset split (its shards, in order) as one: the format found in the
/// first holds for the rest.
pub fn load_files(paths: &[PathBuf], format: Option<DataFormat>) -> Result<Loaded, BadRow> {
    let mut all = Loaded {
        format,
        ..Default::default()
    };
    for path in paths {
        let loaded = load_file(path, all.format)?;
        all.format = loaded.format;
        all.rows.extend(loaded.rows);
        all.bad.extend(loaded.bad);
    }
    Ok(all)
}

/// Parses the bytes of a JSON Lines or JSON preference file named `name`.
pub fn parse_rows(name: &str, bytes: &[u8], format: Option<DataFormat>) -> Result<Loaded, BadRow> {
    rows_from_records(name, json_records(name, bytes)?, format)
}

/// The records of a JSON array or a JSON Lines file, located by line (or by row in an array).
fn json_records(name: &str, bytes: &[u8]) -> Result<Vec<Record>, BadRow> {
    let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(bytes);
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    let mut raw: Vec<Record> = Vec::new();
    if first == Some(&b'[') {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            let line = bytes[..e.valid_up_to()]
                .iter()
                .filter(|b| **b == b'\n')
                .count()
                + 1;
            BadRow {
                location: format!("{name}:{line}"),
                reason: "invalid UTF-8".into(),
            }
        })?;
        let value: Value = serde_json::from_str(text).map_err(|e| BadRow {
            location: format!("{name}:{}", e.line()),
            reason: format!("malformed JSON: {e}"),
        })?;
        for (i, v) in value.as_array().into_iter().flatten().enumerate() {
            raw.push((format!("{name}: row {}", i + 1), Ok(v.clone())));
        }
    } else {
        for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
            let location = format!("{name}:{}", i + 1);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let parsed = match std::str::from_utf8(line) {
                Err(_) => Err("invalid UTF-8".to_string()),
                Ok(text) => {
                    serde_json::from_str::<Value>(text).map_err(|e| format!("malformed JSON: {e}"))
                }
            };
            raw.push((location, parsed));
        }
    }
    Ok(raw)
}

/// Detects the format (or checks the forced one) of each record and normalises it to a pair.
pub(crate) fn rows_from_records(
    name: &str,
    records: Vec<Record>,
    format: Option<DataFormat>,
) -> Result<Loaded, BadRow> {
    let mut loaded = Loaded {
        format,
        ..Default::default()
    };
    for (location, parsed) in records {
        let result = parsed.and_then(|v| {
            let obj = v.as_object().ok_or("a row must be a JSON object")?;
            let detected = detect(obj)?;
            let fmt = *loaded.format.get_or_insert(detected);
            if fmt != detected {
                return Err(format!(
                    "row is in the {detected} format but the file is {fmt}"
                ));
            }
            normalise(obj, fmt)
        });
        match result {
            Ok(row) => loaded.rows.push((location, row)),
            Err(reason) => loaded.bad.push(BadRow { location, reason }),
        }
    }
    if loaded.rows.is_empty() && loaded.bad.is_empty() {
        return Err(BadRow {
            location: name.into(),
            reason: "no rows".into(),
        });
    }
    Ok(loaded)
}

fn detect(obj: &Map<String, Value>) -> Result<DataFormat, String> {
    if obj.contains_key("conversations") {
        return Ok(DataFormat::ShareGpt);
    }
    match obj.get("prompt") {
        Some(Value::String(_)) => Ok(DataFormat::Standard),
        Some(Value::Array(_)) => Ok(DataFormat::Conversational),
        Some(_) => Err("`prompt` must be a string or a list of messages".into()),
        None if obj.contains_key("chosen") || obj.contains_key("rejected") => {
            Ok(DataFormat::Implicit)
        }
        None => Err("missing field `prompt` (or `conversations`, or `chosen`/`rejected`)".into()),
    }
}

fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a Value, String> {
    obj.get(key).ok_or_else(|| format!("missing field `{key}`"))
}

pub(crate) fn text(obj: &Map<String, Value>, key: &str) -> Result<String, String> {
    match field(obj, key)? {
        Value::String(s) if s.trim().is_empty() => Err(format!("`{key}` is empty")),
        Value::String(s) => Ok(s.clone()),
        other => Err(format!("`{key}` must be a string, found {}", kind(other))),
    }
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn messages(obj: &Map<String, Value>, key: &str) -> Result<Vec<ChatMessage>, String> {
    let list = field(obj, key)?
        .as_array()
        .ok_or_else(|| format!("`{key}` must be a list of messages"))?;
    if list.is_empty() {
        return Err(format!("`{key}` is empty"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str);
            let content = m.get("content").and_then(Value::as_str);
            match (role, content) {
                (Some(r), Some(c)) if ["system", "user", "assistant", "tool"].contains(&r) => {
                    Ok(ChatMessage::new(r, c))
                }
                (Some(r), Some(_)) => Err(format!(
                    "`{key}[{i}]`: unknown role `{r}` (valid: system, user, assistant, tool)"
                )),
                _ => Err(format!(
                    "`{key}[{i}]` must have string `role` and `content`"
                )),
            }
        })
        .collect()
}

/// A completion is the model's answer: every message of it must be the assistant's (a user turn in
/// `chosen` would be trained on as if the model had said it).
pub(crate) fn completion_messages(
    key: &str,
    list: Vec<ChatMessage>,
) -> Result<Vec<ChatMessage>, String> {
    if let Some((i, m)) = list.iter().enumerate().find(|(_, m)| m.role != "assistant") {
        return Err(format!(
            "`{key}[{i}]` has role `{}`; a completion holds only `assistant` messages (put earlier \
             turns in `prompt`)",
            m.role
        ));
    }
    Ok(list)
}

pub(crate) fn with_system(
    obj: &Map<String, Value>,
    mut prompt: Vec<ChatMessage>,
) -> Result<Vec<ChatMessage>, String> {
    match obj.get("system") {
        None | Some(Value::Null) => Ok(prompt),
        Some(Value::String(s)) if s.is_empty() => Ok(prompt),
        Some(Value::String(s)) => {
            if prompt.first().is_some_and(|m| m.role == "system") {
                return Err("both a `system` field and a system message".into());
            }
            prompt.insert(0, ChatMessage::new("system", s));
            Ok(prompt)
        }
        Some(other) => Err(format!("`system` must be a string, found {}", kind(other))),
    }
}

fn normalise(obj: &Map<String, Value>, fmt: DataFormat) -> Result<PreferenceRow, String> {
    let row = match fmt {
        DataFormat::Standard => {
            if obj.get("system").is_some_and(|s| !s.is_null()) {
                return Err(
                    "a `system` field needs conversational rows (prompt as a list of messages)"
                        .into(),
                );
            }
            PreferenceRow {
                prompt: Turns::Text(text(obj, "prompt")?),
                chosen: Turns::Text(text(obj, "chosen")?),
                rejected: Turns::Text(text(obj, "rejected")?),
            }
        }
        DataFormat::Conversational => PreferenceRow {
            prompt: Turns::Messages(with_system(obj, messages(obj, "prompt")?)?),
            chosen: Turns::Messages(completion_messages("chosen", messages(obj, "chosen")?)?),
            rejected: Turns::Messages(completion_messages("rejected", messages(obj, "rejected")?)?),
        },
        DataFormat::Implicit => implicit(obj)?,
        DataFormat::ShareGpt => sharegpt(obj)?,
    };
    if row.chosen == row.rejected {
        return Err("chosen and rejected are identical".into());
    }
    Ok(row)
}

/// TRL's `extract_prompt`: the longest common prefix of chosen and rejected is the prompt.
fn implicit(obj: &Map<String, Value>) -> Result<PreferenceRow, String> {
    match (field(obj, "chosen")?, field(obj, "rejected")?) {
        (Value::String(c), Value::String(r)) => {
            let (c, r): (Vec<char>, Vec<char>) = (c.chars().collect(), r.chars().collect());
            let idx = split_point(&c, &r, |prev| *prev == ' ');
            let s = |v: &[char]| v.iter().collect::<String>();
            let (prompt, chosen, rejected) = (s(&c[..idx]), s(&c[idx..]), s(&r[idx..]));
            if prompt.trim().is_empty() {
                return Err("chosen and rejected share no prompt".into());
            }
            if chosen.trim().is_empty() || rejected.trim().is_empty() {
                return Err("a completion is empty after extracting the shared prompt".into());
            }
            Ok(PreferenceRow {
                prompt: Turns::Text(prompt),
                chosen: Turns::Text(chosen),
                rejected: Turns::Text(rejected),
            })
        }
        (Value::Array(_), Value::Array(_)) => {
            let (c, r) = (messages(obj, "chosen")?, messages(obj, "rejected")?);
            let idx = split_point(&c, &r, |_| false);
            if idx == 0 {
                return Err("chosen and rejected share no prompt".into());
            }
            if idx >= c.len() || idx >= r.len() {
                return Err("a completion is empty after extracting the shared prompt".into());
            }
            Ok(PreferenceRow {
                prompt: Turns::Messages(with_system(obj, c[..idx].to_vec())?),
                chosen: Turns::Messages(completion_messages("chosen", c[idx..].to_vec())?),
                rejected: Turns::Messages(completion_messages("rejected", r[idx..].to_vec())?),
            })
        }
        _ => Err("`chosen` and `rejected` must both be strings or both lists of messages".into()),
    }
}

/// The index where `a` and `b` first differ, stepping back over a separating space as TRL does.
fn split_point<T: PartialEq>(a: &[T], b: &[T], is_space: impl Fn(&T) -> bool) -> usize {
    let n = a.len().min(b.len());
    let mut idx = n.saturating_sub(1);
    for i in 0..n {
        if a[i] != b[i] {
            idx = if i > 0 && is_space(&a[i - 1]) {
                i - 1
            } else {
                i
            };
            return idx;
        }
    }
    idx
}

fn sharegpt(obj: &Map<String, Value>) -> Result<PreferenceRow, String> {
    let turns = field(obj, "conversations")?
        .as_array()
        .ok_or("`conversations` must be a list")?;
    if turns.is_empty() {
        return Err("`conversations` is empty".into());
    }
    let mut prompt = Vec::new();
    for (i, t) in turns.iter().enumerate() {
        let (from, value) = sharegpt_turn(t).map_err(|e| format!("`conversations[{i}]`: {e}"))?;
        if from == "system" && i > 0 {
            return Err(format!(
                "`conversations[{i}]`: a `system` turn must come first"
            ));
        }
        prompt.push(ChatMessage::new(from, value));
    }
    if prompt.last().is_some_and(|m| m.role != "user") {
        return Err(format!(
            "`conversations[{}]`: the conversation must end with a `human` turn (the completions \
             answer it)",
            prompt.len() - 1
        ));
    }
    let completion = |key: &str| -> Result<Vec<ChatMessage>, String> {
        let (from, value) = sharegpt_turn(field(obj, key)?).map_err(|e| format!("`{key}`: {e}"))?;
        if from != "assistant" {
            return Err(format!("`{key}` must come from `gpt`"));
        }
        if value.trim().is_empty() {
            return Err(format!("`{key}` is empty"));
        }
        Ok(vec![ChatMessage::new(from, value)])
    };
    Ok(PreferenceRow {
        prompt: Turns::Messages(with_system(obj, prompt)?),
        chosen: Turns::Messages(completion("chosen")?),
        rejected: Turns::Messages(completion("rejected")?),
    })
}

fn sharegpt_turn(t: &Value) -> Result<(&'static str, String), String> {
    let from = t
        .get("from")
        .and_then(Value::as_str)
        .ok_or("needs a string `from`")?;
    let value = t
        .get("value")
        .and_then(Value::as_str)
        .ok_or("needs a string `value`")?;
    let role = match from {
        "system" => "system",
        "human" | "user" => "user",
        "gpt" | "assistant" => "assistant",
        other => {
            return Err(format!(
                "unknown speaker `{other}` (valid: system, human, gpt)"
            ));
        }
    };
    if value.trim().is_empty() && role != "assistant" {
        return Err("empty `value`".into());
    }
    Ok((role, value.to_string()))
}

/// Splits rows into train and eval sets: a seeded shuffle, then the last `ratio` share is eval.
pub fn split_train_eval<T: Clone>(rows: &[T], eval_ratio: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    use rand::{SeedableRng, seq::SliceRandom};
    let mut idx: Vec<usize> = (0..rows.len()).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let n_eval = ((rows.len() as f64) * eval_ratio)
        .round()
        .clamp(if eval_ratio > 0.0 { 1.0 } else { 0.0 }, rows.len() as f64)
        as usize;
    let (train, eval) = idx.split_at(rows.len() - n_eval);
    (
        train.iter().map(|&i| rows[i].clone()).collect(),
        eval.iter().map(|&i| rows[i].clone()).collect(),
    )
}
