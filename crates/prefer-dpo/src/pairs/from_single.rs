//! Pairs from single good responses: rows `{prompt, response}`, the response chosen and a degraded
//! copy of it rejected — cut short, its sentences shuffled, or perturbed (words dropped and
//! neighbours swapped). Each row draws from its own generator seeded by the seed and the row's
//! index, so a file gives the same pairs on every run and machine.

use std::{fmt, str::FromStr};

use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};
use serde_json::Value;

use super::{InputRow, MadePair, completion, object, prompt_of, required};
use crate::data::BadRow;

/// How the rejected completion is made from the good one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// The response cut after 25–75 % of its words.
    Truncate,
    /// Its sentences in another order (its words, when it is one sentence).
    Shuffle,
    /// About 15 % of its words dropped and 15 % of neighbouring words swapped.
    Perturb,
}

impl Reject {
    /// All kinds with their names.
    pub const ALL: [(Reject, &'static str); 3] = [
        (Self::Truncate, "truncate"),
        (Self::Shuffle, "shuffle"),
        (Self::Perturb, "perturb"),
    ];

    /// The name used on the command line and in metadata.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(r, _)| *r == self)
            .map_or("?", |(_, n)| n)
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Reject {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .iter()
            .find(|(_, n)| *n == s)
            .map(|(r, _)| *r)
            .ok_or_else(|| format!("unknown rejection `{s}` (valid: truncate, shuffle, perturb)"))
    }
}

/// What became of the input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SingleReport {
    /// Input rows read.
    pub rows: usize,
    /// Pairs written.
    pub pairs: usize,
    /// Responses too short to degrade (one word, or nothing to reorder).
    pub too_short: usize,
}

/// Pairs from `records` (every row must hold a prompt and a non-empty string response; the first
/// that does not is the error), the rejected completion made by `reject` with `seed`.
pub fn pairs_from_single(
    records: Vec<InputRow>,
    reject: Reject,
    seed: u64,
) -> Result<(Vec<MadePair>, SingleReport), BadRow> {
    let mut report = SingleReport::default();
    let mut pairs = Vec::new();
    for (index, (location, parsed)) in records.into_iter().enumerate() {
        let value = parsed.map_err(|reason| BadRow {
            location: location.clone(),
            reason,
        })?;
        let row = object(&location, &value)?;
        let prompt = prompt_of(&location, row)?;
        let response = match required(&location, row, "response")? {
            Value::String(s) if !s.trim().is_empty() => s.clone(),
            _ => {
                return Err(BadRow {
                    location,
                    reason: "`response` must be a non-empty string".into(),
                });
            }
        };
        report.rows += 1;
        let mut rng =
            StdRng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let Some(rejected) = degrade(&response, reject, &mut rng) else {
            report.too_short += 1;
            continue;
        };
        pairs.push(MadePair {
            chosen: completion(&prompt, &Value::String(response)),
            rejected: completion(&prompt, &Value::String(rejected)),
            chosen_score: None,
            rejected_score: None,
            metadata: serde_json::json!({"source": "single", "reject": reject.name(), "row": location}),
            prompt,
        });
    }
    report.pairs = pairs.len();
    Ok((pairs, report))
}

/// A degraded copy of `text` that differs from it, or `None` when there is nothing to degrade.
fn degrade(text: &str, reject: Reject, rng: &mut StdRng) -> Option<String> {
    let out = match reject {
        Reject::Truncate => truncate(text, rng),
        Reject::Shuffle => shuffle(text, rng),
        Reject::Perturb => perturb(text, rng),
    }?;
    (out.trim() != text.trim() && !out.trim().is_empty()).then_some(out)
}

/// The text up to the end of a word drawn from 25–75 % of its words (at least one word, never all).
fn truncate(text: &str, rng: &mut StdRng) -> Option<String> {
    let ends: Vec<usize> = word_spans(text).map(|(_, end)| end).collect();
    if ends.len() < 2 {
        return None;
    }
    let n = ends.len();
    let low = (n / 4).max(1);
    let high = (3 * n / 4).clamp(low, n - 1);
    let keep = rng.random_range(low..=high);
    Some(text[..ends[keep - 1]].to_string())
}

/// Sentences in a new order; a single sentence has its words shuffled instead.
fn shuffle(text: &str, rng: &mut StdRng) -> Option<String> {
    let sentences = sentences(text);
    let mut parts: Vec<&str> = if sentences.len() >= 2 {
        sentences
    } else {
        text.split_whitespace().collect()
    };
    let original = parts.clone();
    if parts.len() < 2 || parts.iter().all(|p| *p == parts[0]) {
        return None;
    }
    parts.shuffle(rng);
    if parts == original {
        parts.rotate_left(1);
    }
    Some(parts.join(" "))
}

/// Words dropped (15 %) and neighbours swapped (15 %); at least one word is dropped if nothing
/// changed.
fn perturb(text: &str, rng: &mut StdRng) -> Option<String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.len() < 2 {
        return None;
    }
    let mut kept: Vec<&str> = words
        .iter()
        .copied()
        .filter(|_| !rng.random_bool(0.15))
        .collect();
    if kept.is_empty() {
        kept.push(words[0]);
    }
    let mut i = 0;
    while i + 1 < kept.len() {
        if rng.random_bool(0.15) {
            kept.swap(i, i + 1);
            i += 1;
        }
        i += 1;
    }
    if kept == words {
        kept.remove(rng.random_range(0..kept.len()));
    }
    Some(kept.join(" "))
}

/// Byte spans of the whitespace-separated words of `text`.
fn word_spans(text: &str) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut start = None;
    text.char_indices()
        .chain(std::iter::once((text.len(), ' ')))
        .filter_map(move |(i, c)| match (c.is_whitespace(), start) {
            (false, None) => {
                start = Some(i);
                None
            }
            (true, Some(s)) => {
                start = None;
                Some((s, i))
            }
            _ => None,
        })
}

/// Sentences: runs of text ending in `.`, `!` or `?` before whitespace (or the end), trimmed.
fn sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    for (k, &(i, c)) in chars.iter().enumerate() {
        let at_break = matches!(c, '.' | '!' | '?')
            && chars
                .get(k + 1)
                .is_none_or(|(_, next)| next.is_whitespace());
        if at_break {
            let end = i + c.len_utf8();
            let s = text[start..end].trim();
            if !s.is_empty() {
                out.push(s);
            }
            start = end;
        }
    }
    let rest = text[start..].trim();
    if !rest.is_empty() {
        out.push(rest);
    }
    out
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
                    format!("good.jsonl:{}", i + 1),
                    serde_json::from_str(l).map_err(|e| e.to_string()),
                )
            })
            .collect()
    }

    const ROWS: [&str; 3] = [
        r#"{"prompt": "Why is the sky blue?", "response": "Sunlight scatters off air molecules. Blue light scatters most. So the sky looks blue."}"#,
        r#"{"prompt": [{"role": "user", "content": "Name a prime."}], "response": "Seven is a prime number because only one and seven divide it."}"#,
        r#"{"prompt": "Say yes.", "response": "Yes"}"#,
    ];

    #[test]
    fn every_kind_degrades_reproducibly_and_skips_what_it_cannot() {
        for reject in [Reject::Truncate, Reject::Shuffle, Reject::Perturb] {
            let (pairs, report) = pairs_from_single(records(&ROWS), reject, 7).unwrap();
            assert_eq!(
                report,
                SingleReport {
                    rows: 3,
                    pairs: 2,
                    too_short: 1
                },
                "{reject}"
            );
            let (again, _) = pairs_from_single(records(&ROWS), reject, 7).unwrap();
            assert_eq!(pairs, again, "{reject}: the same seed gives the same pairs");
            for p in &pairs {
                assert_ne!(p.chosen, p.rejected, "{reject}");
                assert_eq!(p.metadata["reject"], reject.name());
            }
            // The conversational prompt gets assistant messages.
            assert_eq!(pairs[1].chosen[0]["role"], "assistant");
        }
    }

    #[test]
    fn truncation_keeps_a_prefix_and_shuffling_keeps_the_sentences() {
        let (pairs, _) = pairs_from_single(records(&ROWS[..1]), Reject::Truncate, 1).unwrap();
        let (chosen, rejected) = (
            pairs[0].chosen.as_str().unwrap(),
            pairs[0].rejected.as_str().unwrap(),
        );
        assert!(chosen.starts_with(rejected) && rejected.len() < chosen.len());
        let (pairs, _) = pairs_from_single(records(&ROWS[..1]), Reject::Shuffle, 1).unwrap();
        let mut got = sentences(pairs[0].rejected.as_str().unwrap());
        let mut want = sentences(pairs[0].chosen.as_str().unwrap());
        assert_ne!(got, want);
        got.sort();
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn bad_rows_name_the_row() {
        for (line, says) in [
            (r#"{"prompt": "a"}"#, "missing key `response`"),
            (
                r#"{"prompt": "a", "response": 3}"#,
                "must be a non-empty string",
            ),
            (r#"{"prompt": "", "response": "x y"}"#, "`prompt` must be"),
        ] {
            let err = pairs_from_single(records(&[ROWS[0], line]), Reject::Perturb, 0).unwrap_err();
            assert_eq!(err.location, "good.jsonl:2");
            assert!(err.reason.contains(says), "{line}: {err}");
        }
        assert!(
            "drop"
                .parse::<Reject>()
                .unwrap_err()
                .contains("truncate, shuffle, perturb")
        );
    }
}
