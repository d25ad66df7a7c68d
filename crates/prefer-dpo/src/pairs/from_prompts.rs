//! Pairs from the model itself (on-policy): `samples` completions sampled per prompt, each scored
//! by a [`Judge`], then paired as scored responses are ([`pairs_from_scores`]). With `prefer
//! train` on the result and the trained adapter sampling the next round, this is iterative DPO.

use prefer_kernels::LayerBackend;
use prefer_llama::{
    ChatMessage, ChatTokenizer, LinearLayer, LlamaModel, SamplingConfig, generate_batch,
};
use serde_json::{Value, json};

use super::{
    InputRow, MadePair, ScoredReport,
    judge::{Judge, JudgeError, JudgeInput},
    object, pairs_from_scores, prompt_of,
};
use crate::data::{
    BadRow,
    formats::{messages, with_system},
};

/// One prompt to sample from.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRow {
    /// Where the row came from (`file:line`).
    pub location: String,
    /// The prompt as the input had it (a string, or a list of messages).
    pub prompt: Value,
    /// The row's `reference` answer, for the `exact` judge and command judges.
    pub reference: Option<String>,
    /// The prompt's token ids, as `DPOTrainer` tokenises a prompt: a string with the tokenizer's
    /// special tokens, messages through the chat template with a generation prompt.
    pub ids: Vec<u32>,
}

/// How many completions to sample and how.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// Completions per prompt.
    pub samples: usize,
    /// Temperature, top-p, new-token limits and the seed.
    pub sampling: SamplingConfig,
    /// Rows (prompt × sample) generated in one batch.
    pub batch_size: usize,
}

/// What sampling and scoring made.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PromptsReport {
    /// Completions sampled.
    pub sampled: usize,
    /// Empty completions (the model ended at once), left out of the pairs.
    pub empty: usize,
    /// The pairing of the scored completions.
    pub scored: ScoredReport,
}

/// The prompt rows of `records` (`{"prompt", "reference"?, "system"?}`), tokenised with `tok`.
pub fn prompt_rows(records: Vec<InputRow>, tok: &ChatTokenizer) -> Result<Vec<PromptRow>, BadRow> {
    records
        .into_iter()
        .map(|(location, parsed)| {
            let bad = |reason: String| BadRow {
                location: location.clone(),
                reason,
            };
            let value = parsed.map_err(bad)?;
            let row = object(&location, &value)?;
            let prompt = prompt_of(&location, row)?;
            let reference = match row.get("reference") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => return Err(bad("`reference` must be a string".into())),
            };
            let ids = match &prompt {
                Value::String(text) => tok.encode(text, true).map_err(|e| bad(e.to_string()))?,
                _ => {
                    let turns: Vec<ChatMessage> =
                        with_system(row, messages(row, "prompt").map_err(bad)?).map_err(bad)?;
                    let text = tok
                        .apply_chat_template(&turns, true)
                        .map_err(|e| bad(e.to_string()))?;
                    tok.encode(&text, false).map_err(|e| bad(e.to_string()))?
                }
            };
            if ids.is_empty() {
                return Err(bad("the prompt is empty after tokenisation".into()));
            }
            Ok(PromptRow {
                location,
                prompt,
                reference,
                ids,
            })
        })
        .collect()
}

/// `options.samples` completions of every row, decoded without special tokens: `[row][sample]`.
/// Rows are generated `options.batch_size` at a time, each batch seeded from the seed and its
/// index, so a run repeats exactly.
pub fn sample_completions<B: LayerBackend, L: LinearLayer<B>>(
    model: &LlamaModel<B, L>,
    tok: &ChatTokenizer,
    rows: &[PromptRow],
    options: &SampleOptions,
) -> Result<Vec<Vec<String>>, String> {
    let mut stops = model.config.eos_token_ids.clone();
    if let Some(id) = tok.eos_token.as_deref().and_then(|t| tok.token_id(t)) {
        stops.push(id);
    }
    let k = options.samples.max(1);
    let all: Vec<Vec<u32>> = rows
        .iter()
        .flat_map(|r| std::iter::repeat_n(r.ids.clone(), k))
        .collect();
    let mut texts = Vec::with_capacity(all.len());
    for (b, chunk) in all.chunks(options.batch_size.max(1)).enumerate() {
        let config = SamplingConfig {
            seed: options.sampling.seed.wrapping_add(b as u64),
            ..options.sampling.clone()
        };
        for mut tokens in
            generate_batch(model, chunk, &config, &stops).map_err(|e| e.to_string())?
        {
            tokens.retain(|t| !stops.contains(t));
            texts.push(tok.decode(&tokens, true).map_err(|e| e.to_string())?);
        }
    }
    Ok(texts.chunks(k).map(<[String]>::to_vec).collect())
}

/// Scores every non-empty completion with `judge` and pairs each prompt's completions as
/// [`pairs_from_scores`] does, keeping pairs whose scores differ by at least `min_score_diff`.
/// Each pair's metadata names its prompt row and sample numbers.
pub fn pairs_from_samples(
    rows: &[PromptRow],
    completions: &[Vec<String>],
    judge: &Judge,
    min_score_diff: f64,
) -> Result<(Vec<MadePair>, PromptsReport), JudgeError> {
    let mut report = PromptsReport::default();
    let mut inputs = Vec::new();
    let mut locations = Vec::new();
    for (row, samples) in rows.iter().zip(completions) {
        for (s, text) in samples.iter().enumerate() {
            report.sampled += 1;
            if text.trim().is_empty() {
                report.empty += 1;
                continue;
            }
            locations.push(format!("{} sample {}", row.location, s + 1));
            inputs.push(JudgeInput {
                prompt: row.prompt.clone(),
                response: text.clone(),
                reference: row.reference.clone(),
            });
        }
    }
    let scores = judge.score(&inputs)?;
    let records: Vec<InputRow> = inputs
        .into_iter()
        .zip(scores)
        .zip(locations)
        .map(|((i, score), location)| {
            let row = json!({"prompt": i.prompt, "response": i.response, "score": score});
            (location, Ok(row))
        })
        .collect();
    let (pairs, scored) = pairs_from_scores(records, min_score_diff).map_err(|e| JudgeError {
        judge: judge.to_string(),
        message: e.to_string(),
    })?;
    report.scored = scored;
    Ok((pairs, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(prompt: &str, location: &str) -> PromptRow {
        PromptRow {
            location: location.into(),
            prompt: json!(prompt),
            reference: None,
            ids: vec![1, 2],
        }
    }

    /// Each prompt's samples are paired best with worst by the judge's scores; empty samples are
    /// counted and left out, and the metadata names the prompt row and the samples.
    #[test]
    fn samples_are_scored_and_paired_per_prompt() {
        let rows = [row("A?", "p.jsonl:1"), row("B?", "p.jsonl:2")];
        let completions = vec![
            vec!["x".to_string(), "xxxx".into(), "".into(), "xx".into()],
            vec!["same".to_string(), "same".into()],
        ];
        let (pairs, report) = pairs_from_samples(&rows, &completions, &Judge::Length, 0.5).unwrap();
        assert_eq!(report.sampled, 6);
        assert_eq!(report.empty, 1);
        assert_eq!(report.scored.ties, 1);
        assert_eq!(pairs.len(), 1);
        let p = &pairs[0];
        assert_eq!(
            (p.chosen.as_str(), p.rejected.as_str()),
            (Some("xxxx"), Some("x"))
        );
        assert_eq!((p.chosen_score, p.rejected_score), (Some(4.0), Some(1.0)));
        let meta = p.metadata.to_string();
        assert!(meta.contains("p.jsonl:1 sample 2"), "{meta}");
        assert!(meta.contains("p.jsonl:1 sample 1"), "{meta}");
    }
}
