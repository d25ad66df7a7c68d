//! Making preference pairs: from scored responses ([`from_scores`]), from single good responses
//! with a degraded copy as the rejected one ([`from_single`]), or from the model's own samples
//! scored by a [`Judge`] ([`from_prompts`]). The output is TRL's format (prompt,
//! chosen, rejected) plus scores and metadata, which prefer's and TRL's loaders read.

pub mod from_prompts;
pub mod from_scores;
pub mod from_single;
pub mod judge;

use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

pub use from_prompts::{
    PromptRow, PromptsReport, SampleOptions, pairs_from_samples, prompt_rows, sample_completions,
};
pub use from_scores::{ScoredReport, pairs_from_scores};
pub use from_single::{Reject, SingleReport, pairs_from_single};
pub use judge::{Judge, JudgeError, JudgeInput};

use crate::data::BadRow;

/// One input row: its location (`file:line` or `file: row N`) and its JSON value, or why the
/// line is not JSON.
pub type InputRow = (String, Result<Value, String>);

/// One preference pair as written: TRL's keys, then where it came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MadePair {
    /// The prompt as the input had it (a string, or a list of messages).
    pub prompt: Value,
    /// The preferred completion: a string after a string prompt, else one assistant message.
    pub chosen: Value,
    /// The other completion, in the same form.
    pub rejected: Value,
    /// The chosen response's score (pairs from scores).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chosen_score: Option<f64>,
    /// The rejected response's score (pairs from scores).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected_score: Option<f64>,
    /// How the pair was made and from which input rows.
    pub metadata: Value,
}

/// A completion in the form TRL expects after `prompt`: text after a text prompt; after a list of
/// messages, a list holding one assistant message (a response that is already a list is kept).
pub(crate) fn completion(prompt: &Value, response: &Value) -> Value {
    match (prompt, response) {
        (Value::Array(_), Value::String(text)) => {
            serde_json::json!([{"role": "assistant", "content": text}])
        }
        _ => response.clone(),
    }
}

/// The object of a raw record, or why it is not one.
pub(crate) fn object<'a>(
    location: &str,
    value: &'a Value,
) -> Result<&'a Map<String, Value>, BadRow> {
    value.as_object().ok_or_else(|| BadRow {
        location: location.to_string(),
        reason: "a row must be a JSON object".into(),
    })
}

/// The value of `key`, or an error naming the row and the key.
pub(crate) fn required<'a>(
    location: &str,
    row: &'a Map<String, Value>,
    key: &str,
) -> Result<&'a Value, BadRow> {
    row.get(key).ok_or_else(|| BadRow {
        location: location.to_string(),
        reason: format!("missing key `{key}`"),
    })
}

/// A prompt: a non-empty string or a non-empty list of messages.
pub(crate) fn prompt_of(location: &str, row: &Map<String, Value>) -> Result<Value, BadRow> {
    match required(location, row, "prompt")? {
        Value::String(s) if !s.trim().is_empty() => Ok(Value::String(s.clone())),
        Value::Array(a) if !a.is_empty() => Ok(Value::Array(a.clone())),
        _ => Err(BadRow {
            location: location.to_string(),
            reason: "`prompt` must be a non-empty string or list of messages".into(),
        }),
    }
}

/// The rows of an input file (JSON Lines, a JSON array or Parquet), each with its location
/// (`file:line` or `file: row N`) and its JSON value or why it has none.
pub fn input_rows(path: &Path) -> Result<Vec<InputRow>, BadRow> {
    crate::data::formats::file_records(path)
}

/// Writes `pairs` as JSON Lines to `path` through a temporary file renamed into place, so a
/// failure leaves no half-written file.
pub fn write_pairs(path: &Path, pairs: &[MadePair]) -> std::io::Result<()> {
    let mut text = String::new();
    for pair in pairs {
        text.push_str(&serde_json::to_string(pair).map_err(std::io::Error::other)?);
        text.push('\n');
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
