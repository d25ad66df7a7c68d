//! Token ids exactly as TRL 1.16's `DPOTrainer` makes them.
//!
//! Standard rows: EOS text is appended to each completion (unless present), then the prompt,
//! prompt+chosen and prompt+rejected are tokenised with the tokenizer's special tokens. Conversational
//! rows: the chat template renders the prompt with a generation prompt, and the prompt followed by
//! each completion; the template decides what ends a turn. The completion starts where the tokenised
//! prompt and prompt+completion first differ (tokens can merge across the boundary).

use prefer_llama::{ChatMessage, ChatTokenizer};

use super::formats::{BadRow, PreferenceRow, Turns};

/// A pair as token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPair {
    /// Where the row came from.
    pub location: String,
    /// Prompt ids.
    pub prompt: Vec<u32>,
    /// Chosen completion ids.
    pub chosen: Vec<u32>,
    /// Rejected completion ids.
    pub rejected: Vec<u32>,
}

/// Length limits applied per row before batching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenizeOptions {
    /// Keep the last `n` prompt tokens (older TRL's `max_prompt_length`).
    pub max_prompt_length: Option<usize>,
    /// Keep the first `n` tokens of each completion (older TRL's `max_completion_length`).
    pub max_completion_length: Option<usize>,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Prompt, chosen and rejected ids of one row.
pub type RowIds = (Vec<u32>, Vec<u32>, Vec<u32>);

/// Tokenises one row.
pub fn tokenize_row(tok: &ChatTokenizer, row: &PreferenceRow) -> Result<RowIds, String> {
    let err = |e: prefer_llama::LoadError| e.to_string();
    let (p, pc, pr) = match (&row.prompt, &row.chosen, &row.rejected) {
        (Turns::Text(p), Turns::Text(c), Turns::Text(r)) => {
            let eos = tok
                .eos_token
                .clone()
                .ok_or("the tokenizer has no EOS token to end completions")?;
            let end = |s: &str| {
                if s.ends_with(&eos) {
                    s.to_string()
                } else {
                    format!("{s}{eos}")
                }
            };
            (
                tok.encode(p, true).map_err(err)?,
                tok.encode(&format!("{p}{}", end(c)), true).map_err(err)?,
                tok.encode(&format!("{p}{}", end(r)), true).map_err(err)?,
            )
        }
        (Turns::Messages(p), Turns::Messages(c), Turns::Messages(r)) => {
            let render = |m: &[ChatMessage], generation_prompt: bool| -> Result<Vec<u32>, String> {
                let text = tok.apply_chat_template(m, generation_prompt).map_err(err)?;
                tok.encode(&text, false).map_err(err)
            };
            (
                render(p, true)?,
                render(&[p.clone(), c.clone()].concat(), false)?,
                render(&[p.clone(), r.clone()].concat(), false)?,
            )
        }
        _ => return Err("prompt and completions must be all text or all messages".into()),
    };
    let n = common_prefix(&p, &pc).min(common_prefix(&p, &pr));
    Ok((p[..n].to_vec(), pc[n..].to_vec(), pr[n..].to_vec()))
}

/// Tokenises rows; rows that end up with an empty prompt or completion are bad rows.
pub fn tokenize_rows(
    tok: &ChatTokenizer,
    rows: &[(String, PreferenceRow)],
    options: TokenizeOptions,
) -> (Vec<TokenizedPair>, Vec<BadRow>) {
    let mut pairs = Vec::new();
    let mut bad = Vec::new();
    for (location, row) in rows {
        let result = tokenize_row(tok, row).and_then(|(mut prompt, mut chosen, mut rejected)| {
            if let Some(m) = options.max_prompt_length {
                let cut = prompt.len().saturating_sub(m);
                prompt.drain(..cut);
            }
            if let Some(m) = options.max_completion_length {
                chosen.truncate(m);
                rejected.truncate(m);
            }
            if prompt.is_empty() {
                return Err("the prompt is empty after tokenisation".to_string());
            }
            if chosen.is_empty() || rejected.is_empty() {
                return Err("a completion is empty after tokenisation and truncation".to_string());
            }
            Ok(TokenizedPair {
                location: location.clone(),
                prompt,
                chosen,
                rejected,
            })
        });
        match result {
            Ok(p) => pairs.push(p),
            Err(reason) => bad.push(BadRow {
                location: location.clone(),
                reason,
            }),
        }
    }
    (pairs, bad)
}
