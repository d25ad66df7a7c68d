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
///
/// A KTO example travels as a pair too, so that batching, shuffling, reference log-probs and
/// resuming treat it alike: `chosen` holds its completion, `rejected` the KL completion (another
/// example's, scored against this prompt for KTO's reference point), and `label` whether the
/// completion is desirable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPair {
    /// Where the row came from.
    pub location: String,
    /// Prompt ids.
    pub prompt: Vec<u32>,
    /// Chosen completion ids (a KTO example's completion).
    pub chosen: Vec<u32>,
    /// Rejected completion ids (a KTO example's KL completion).
    pub rejected: Vec<u32>,
    /// A KTO example's label (desirable or not); `None` for a preference pair.
    pub label: Option<bool>,
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
    let p = prompt_ids(tok, &row.prompt)?;
    let pc = sequence_ids(tok, &row.prompt, &row.chosen)?;
    let pr = sequence_ids(tok, &row.prompt, &row.rejected)?;
    let n = common_prefix(&p, &pc).min(common_prefix(&p, &pr));
    Ok((p[..n].to_vec(), pc[n..].to_vec(), pr[n..].to_vec()))
}

/// Prompt and completion ids of one prompt with one completion (a KTO example).
pub fn tokenize_completion(
    tok: &ChatTokenizer,
    prompt: &Turns,
    completion: &Turns,
) -> Result<(Vec<u32>, Vec<u32>), String> {
    let p = prompt_ids(tok, prompt)?;
    let pc = sequence_ids(tok, prompt, completion)?;
    let n = common_prefix(&p, &pc);
    Ok((p[..n].to_vec(), pc[n..].to_vec()))
}

/// The prompt alone: text with the tokenizer's special tokens, or messages rendered by the chat
/// template with the generation prompt.
fn prompt_ids(tok: &ChatTokenizer, prompt: &Turns) -> Result<Vec<u32>, String> {
    match prompt {
        Turns::Text(p) => tok.encode(p, true).map_err(|e| e.to_string()),
        Turns::Messages(p) => render(tok, p, true),
    }
}

/// The prompt followed by a completion: text completions end with the EOS text (unless they
/// already do); messages are rendered whole, the template deciding what ends a turn.
fn sequence_ids(
    tok: &ChatTokenizer,
    prompt: &Turns,
    completion: &Turns,
) -> Result<Vec<u32>, String> {
    match (prompt, completion) {
        (Turns::Text(p), Turns::Text(c)) => {
            let eos = tok
                .eos_token
                .as_deref()
                .ok_or("the tokenizer has no EOS token to end completions")?;
            let end = if c.ends_with(eos) { "" } else { eos };
            tok.encode(&format!("{p}{c}{end}"), true)
                .map_err(|e| e.to_string())
        }
        (Turns::Messages(p), Turns::Messages(c)) => {
            render(tok, &[p.clone(), c.clone()].concat(), false)
        }
        _ => Err("prompt and completions must be all text or all messages".into()),
    }
}

fn render(
    tok: &ChatTokenizer,
    messages: &[ChatMessage],
    generation_prompt: bool,
) -> Result<Vec<u32>, String> {
    let text = tok
        .apply_chat_template(messages, generation_prompt)
        .map_err(|e| e.to_string())?;
    tok.encode(&text, false).map_err(|e| e.to_string())
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
                label: None,
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
