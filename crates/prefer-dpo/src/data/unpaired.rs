//! KTO's data: unpaired examples (`{"prompt", "completion", "label"}`, standard or
//! conversational), or preference pairs split as TRL's `unpair_preference_dataset` splits them;
//! token ids as TRL 1.16's `KTOTrainer` makes them; and each example's KL completion — its batch
//! neighbour's — for KTO's reference point.

use std::path::PathBuf;

use prefer_llama::ChatTokenizer;
use serde_json::{Map, Value};

use super::{
    collate::{TruncationMode, drop_truncated_away},
    formats::{
        BadRow, DataFormat, OnBadRow, PreferenceRow, Turns, completion_messages, file_records,
        kind, messages, rows_from_records, text, with_system,
    },
    tokenize::{TokenizeOptions, TokenizedPair, tokenize_completion},
};

/// One prompt with one completion, desirable or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpairedRow {
    /// The prompt.
    pub prompt: Turns,
    /// The completion.
    pub completion: Turns,
    /// Whether the completion is desirable.
    pub label: bool,
}

/// The usable examples of a split's files and the rows that were not.
#[derive(Debug, Clone, Default)]
pub struct LoadedExamples {
    /// Examples with their locations.
    pub rows: Vec<(String, UnpairedRow)>,
    /// Rows that could not be used.
    pub bad: Vec<BadRow>,
}

impl LoadedExamples {
    /// Applies the bad-row policy: the first bad row as an error, or the rows kept.
    pub fn check(self, policy: OnBadRow) -> Result<Self, BadRow> {
        match (policy, self.bad.first()) {
            (OnBadRow::Error, Some(b)) => Err(b.clone()),
            _ => Ok(self),
        }
    }
}

/// An example as token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedExample {
    /// Where the row came from.
    pub location: String,
    /// Prompt ids.
    pub prompt: Vec<u32>,
    /// Completion ids.
    pub completion: Vec<u32>,
    /// Whether the completion is desirable.
    pub label: bool,
}

/// TRL's `unpair_preference_dataset` maps the dataset in batches of this many rows.
const UNPAIR_CHUNK: usize = 1000;

/// Reads the files of one split as KTO examples. A file whose first row has a `label` holds
/// unpaired examples; any other is read as preference pairs, which are split (after all files
/// are read) as TRL splits them: per 1000 pairs, every chosen completion as a desirable example,
/// then every rejected one as an undesirable example. `format` forces the format of pair files.
pub fn load_examples(
    paths: &[PathBuf],
    format: Option<DataFormat>,
) -> Result<LoadedExamples, BadRow> {
    let mut out = LoadedExamples::default();
    let mut pairs: Vec<(String, PreferenceRow)> = Vec::new();
    let mut first_kind: Option<(bool, String)> = None;
    for path in paths {
        let name = path.display().to_string();
        let records = file_records(path)?;
        let unpaired = records
            .iter()
            .find_map(|(_, r)| r.as_ref().ok())
            .is_some_and(|v| v.as_object().is_some_and(|o| o.contains_key("label")));
        match &first_kind {
            Some((k, first)) if *k != unpaired => {
                return Err(BadRow {
                    location: name,
                    reason: format!(
                        "this file holds {} but {first} holds {}; a split is all one or the other",
                        what(unpaired),
                        what(*k)
                    ),
                });
            }
            _ => first_kind = Some((unpaired, name.clone())),
        }
        if unpaired {
            if records.is_empty() {
                return Err(BadRow {
                    location: name,
                    reason: "no rows".into(),
                });
            }
            for (location, parsed) in records {
                match parsed.and_then(|v| unpaired_row(&v)) {
                    Ok(row) => out.rows.push((location, row)),
                    Err(reason) => out.bad.push(BadRow { location, reason }),
                }
            }
        } else {
            let loaded = rows_from_records(&name, records, format)?;
            pairs.extend(loaded.rows);
            out.bad.extend(loaded.bad);
        }
    }
    out.rows.extend(unpair(pairs));
    Ok(out)
}

fn what(unpaired: bool) -> &'static str {
    if unpaired {
        "unpaired examples (`label`)"
    } else {
        "preference pairs"
    }
}

/// Splits preference pairs into examples as TRL does: per 1000 pairs, the chosen completions
/// (desirable) then the rejected ones (undesirable).
pub fn unpair(pairs: Vec<(String, PreferenceRow)>) -> Vec<(String, UnpairedRow)> {
    let mut out = Vec::with_capacity(2 * pairs.len());
    for chunk in pairs.chunks(UNPAIR_CHUNK) {
        for label in [true, false] {
            out.extend(chunk.iter().map(|(location, row)| {
                let (completion, part) = match label {
                    true => (row.chosen.clone(), "chosen"),
                    false => (row.rejected.clone(), "rejected"),
                };
                let example = UnpairedRow {
                    prompt: row.prompt.clone(),
                    completion,
                    label,
                };
                (format!("{location} ({part})"), example)
            }));
        }
    }
    out
}

/// One `{"prompt", "completion", "label"}` row (an optional `system` with messages).
fn unpaired_row(v: &Value) -> Result<UnpairedRow, String> {
    let obj: &Map<String, Value> = v.as_object().ok_or("a row must be a JSON object")?;
    let label = match obj.get("label") {
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(format!(
                "`label` must be true or false, found {}",
                kind(other)
            ));
        }
        None => return Err("missing field `label` (true: desirable, false: undesirable)".into()),
    };
    let (prompt, completion) = match obj.get("prompt") {
        Some(Value::String(_)) => {
            if obj.get("system").is_some_and(|s| !s.is_null()) {
                return Err(
                    "a `system` field needs conversational rows (prompt as a list of messages)"
                        .into(),
                );
            }
            (
                Turns::Text(text(obj, "prompt")?),
                Turns::Text(text(obj, "completion")?),
            )
        }
        Some(Value::Array(_)) => (
            Turns::Messages(with_system(obj, messages(obj, "prompt")?)?),
            Turns::Messages(completion_messages(
                "completion",
                messages(obj, "completion")?,
            )?),
        ),
        Some(_) => return Err("`prompt` must be a string or a list of messages".into()),
        None => return Err("missing field `prompt`".into()),
    };
    Ok(UnpairedRow {
        prompt,
        completion,
        label,
    })
}

/// Tokenises examples; those that end up with an empty prompt or completion are bad rows.
pub fn tokenize_examples(
    tok: &ChatTokenizer,
    rows: &[(String, UnpairedRow)],
    options: TokenizeOptions,
) -> (Vec<TokenizedExample>, Vec<BadRow>) {
    let mut examples = Vec::new();
    let mut bad = Vec::new();
    for (location, row) in rows {
        let result = tokenize_completion(tok, &row.prompt, &row.completion).and_then(
            |(mut prompt, mut completion)| {
                if let Some(m) = options.max_prompt_length {
                    prompt.drain(..prompt.len().saturating_sub(m));
                }
                if let Some(m) = options.max_completion_length {
                    completion.truncate(m);
                }
                if prompt.is_empty() {
                    return Err("the prompt is empty after tokenisation".to_string());
                }
                if completion.is_empty() {
                    return Err(
                        "the completion is empty after tokenisation and truncation".to_string()
                    );
                }
                Ok(TokenizedExample {
                    location: location.clone(),
                    prompt,
                    completion,
                    label: row.label,
                })
            },
        );
        match result {
            Ok(e) => examples.push(e),
            Err(reason) => bad.push(BadRow {
                location: location.clone(),
                reason,
            }),
        }
    }
    (examples, bad)
}

/// Checks that every pair is a KTO example (it has a label), as [`kto_pairs`] makes them: a
/// preference pair given to KTO as it is would have no label to train on.
pub fn check_labels(pairs: &[TokenizedPair]) -> Result<(), BadRow> {
    match pairs.iter().find(|p| p.label.is_none()) {
        Some(p) => Err(BadRow {
            location: p.location.clone(),
            reason: "method kto trains on labelled examples, and this is a preference pair: \
                     split pairs into examples with `kto_pairs` (`prefer train` and `prefer eval` \
                     do)"
            .into(),
        }),
        None => Ok(()),
    }
}

/// Examples as the trainer runs them: those whose prompt fills `max_length` dropped (bad rows,
/// as for pairs), then each given the KL completion of its neighbour, rotating the completions by
/// one within consecutive batches of `batch_size` as TRL does —
/// `(x₁, y₁) … (xₙ, yₙ)` → KL pairs `(x₁, yₙ), (x₂, y₁) … (xₙ, yₙ₋₁)` — so that a batch's KL
/// completions are its own completions matched to other prompts.
pub fn kto_pairs(
    examples: Vec<TokenizedExample>,
    max_length: Option<usize>,
    mode: TruncationMode,
    batch_size: usize,
) -> (Vec<TokenizedPair>, Vec<BadRow>) {
    let as_pairs = examples
        .into_iter()
        .map(|e| TokenizedPair {
            location: e.location,
            prompt: e.prompt,
            rejected: Vec::new(),
            chosen: e.completion,
            label: Some(e.label),
        })
        .collect();
    let (mut kept, bad) = drop_truncated_away(as_pairs, max_length, mode);
    for batch in kept.chunks_mut(batch_size.max(1)) {
        let n = batch.len();
        for i in 0..n {
            batch[i].rejected = batch[(i + n - 1) % n].chosen.clone();
        }
    }
    (kept, bad)
}
