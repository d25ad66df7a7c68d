//! Batches as TRL's DPO collator builds them: rows `[prompt+chosen ×P, prompt+rejected ×P]`,
//! each truncated to `max_length` (keeping its start or its end), right-padded, with completion masks.

use super::{batch::HostBatch, formats::BadRow, tokenize::TokenizedPair};

/// Which end of a too-long sequence to keep (`truncation_mode`: `keep_start` or `keep_end`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TruncationMode {
    /// Keep the first `max_length` tokens (TRL's default); pairs whose prompt fills `max_length`
    /// are dropped before batching, as TRL does.
    #[default]
    KeepStart,
    /// Keep the last `max_length` tokens.
    KeepEnd,
}

/// With `KeepStart`, a pair whose prompt alone fills `max_length` would keep no completion token:
/// such pairs are bad rows ("completion truncated away"), as TRL drops them.
pub fn drop_truncated_away(
    pairs: Vec<TokenizedPair>,
    max_length: Option<usize>,
    mode: TruncationMode,
) -> (Vec<TokenizedPair>, Vec<BadRow>) {
    let Some(m) = max_length.filter(|_| mode == TruncationMode::KeepStart) else {
        return (pairs, Vec::new());
    };
    let (kept, dropped): (Vec<_>, Vec<_>) = pairs.into_iter().partition(|p| p.prompt.len() < m);
    let bad = dropped
        .into_iter()
        .map(|p| BadRow {
            location: p.location,
            reason: format!(
                "completion truncated away: the prompt alone has {} tokens and max_length is {m}; \
                 raise `max_length`, set `max_prompt_length` (below {m}; keeps the prompt's end), \
                 or set `on_bad_row = \"skip\"` to drop such rows (`prefer inspect DATA --model M` \
                 counts them)",
                p.prompt.len()
            ),
        })
        .collect();
    (kept, bad)
}

/// Checks that every token id of `pairs`, and the pad id, is below `vocab_size`, once before any
/// batch is built: an id beyond the vocabulary (a tokenizer larger than the model's embedding, a
/// corrupt id) would panic on the CPU and read out of bounds on a GPU, where the fused LM head
/// clamps its targets.
pub fn check_vocab(pairs: &[TokenizedPair], pad_id: u32, vocab_size: usize) -> Result<(), BadRow> {
    let outside = |id: u32| id as usize >= vocab_size;
    if outside(pad_id) {
        return Err(BadRow {
            location: "the pad token".into(),
            reason: format!(
                "pad id {pad_id} is outside the model's vocabulary of {vocab_size} tokens; \
                 set a pad token the model has"
            ),
        });
    }
    for p in pairs {
        for (part, ids) in [
            ("prompt", &p.prompt),
            ("chosen", &p.chosen),
            ("rejected", &p.rejected),
        ] {
            if let Some(id) = ids.iter().copied().find(|&id| outside(id)) {
                return Err(BadRow {
                    location: p.location.clone(),
                    reason: format!(
                        "token id {id} in the {part} is outside the model's vocabulary of \
                         {vocab_size} tokens; the tokenizer does not match the model"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Builds a batch from pairs (whose ids [`check_vocab`] has checked): the chosen sequences, then
/// the rejected ones.
pub fn collate(
    pairs: &[&TokenizedPair],
    pad_id: u32,
    max_length: Option<usize>,
    mode: TruncationMode,
) -> HostBatch {
    let chosen = pairs.iter().map(|p| (&p.prompt, &p.chosen));
    let rejected = pairs.iter().map(|p| (&p.prompt, &p.rejected));
    let mut batch = collate_rows(chosen.chain(rejected), pad_id, max_length, mode);
    batch.labels = pairs.iter().filter_map(|p| p.label).collect();
    batch
}

/// KTO's examples as two batches of one row per example: their completions (with the labels), and their
/// KL completions — which only set the reference point, so they run apart from the rows that
/// take gradients.
pub fn collate_kto(
    examples: &[&TokenizedPair],
    pad_id: u32,
    max_length: Option<usize>,
    mode: TruncationMode,
) -> (HostBatch, HostBatch) {
    let completions = examples.iter().map(|p| (&p.prompt, &p.chosen));
    let mut batch = collate_rows(completions, pad_id, max_length, mode);
    batch.labels = examples.iter().filter_map(|p| p.label).collect();
    let kl = examples.iter().map(|p| (&p.prompt, &p.rejected));
    (batch, collate_rows(kl, pad_id, max_length, mode))
}

/// One right-padded row per (prompt, completion), each truncated to `max_length` as `mode` says.
fn collate_rows<'a>(
    rows: impl Iterator<Item = (&'a Vec<u32>, &'a Vec<u32>)>,
    pad_id: u32,
    max_length: Option<usize>,
    mode: TruncationMode,
) -> HostBatch {
    let mut seqs: Vec<(Vec<u32>, Vec<i64>)> = Vec::new();
    for (prompt, completion) in rows {
        let mut ids = prompt.clone();
        ids.extend(completion);
        let mut mask = vec![0i64; prompt.len()];
        mask.extend(std::iter::repeat_n(1, completion.len()));
        if let Some(m) = max_length.filter(|m| ids.len() > *m) {
            match mode {
                TruncationMode::KeepStart => {
                    ids.truncate(m);
                    mask.truncate(m);
                }
                TruncationMode::KeepEnd => {
                    ids.drain(..ids.len() - m);
                    mask.drain(..mask.len() - m);
                }
            }
        }
        seqs.push((ids, mask));
    }
    let t = seqs.iter().map(|s| s.0.len()).max().unwrap_or(0);
    let mut b = HostBatch {
        input_ids: vec![],
        attention_mask: vec![],
        completion_mask: vec![],
        shape: [seqs.len(), t],
        labels: Vec::new(),
    };
    for (ids, mask) in &seqs {
        b.input_ids.extend(
            ids.iter()
                .map(|&x| x as i64)
                .chain(std::iter::repeat_n(pad_id as i64, t - ids.len())),
        );
        b.attention_mask
            .extend(std::iter::repeat_n(1, ids.len()).chain(std::iter::repeat_n(0, t - ids.len())));
        b.completion_mask.extend(
            mask.iter()
                .copied()
                .chain(std::iter::repeat_n(0, t - ids.len())),
        );
    }
    b
}

/// Orders pairs so that each batch holds pairs of similar length (less padding): a seeded shuffle,
/// then a sort by length within windows of `window_batches` batches, then the batches shuffled.
pub fn group_by_length(
    pairs: &[TokenizedPair],
    batch_size: usize,
    window_batches: usize,
    seed: u64,
) -> Vec<usize> {
    use rand::{SeedableRng, seq::SliceRandom};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut idx: Vec<usize> = (0..pairs.len()).collect();
    idx.shuffle(&mut rng);
    let len =
        |i: &usize| pairs[*i].prompt.len() + pairs[*i].chosen.len().max(pairs[*i].rejected.len());
    for window in idx.chunks_mut(batch_size.max(1) * window_batches.max(1)) {
        window.sort_by_key(len);
    }
    let mut batches: Vec<Vec<usize>> = idx
        .chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect();
    batches.shuffle(&mut rng);
    batches.concat()
}
