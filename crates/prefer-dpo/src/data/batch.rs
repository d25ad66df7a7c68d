//! A batch of pairs, on the host as TRL's collator builds it (rows `[chosen ×P, rejected ×P]`,
//! right-padded) and on a device as the model runs it: padded, or padding-free (the rows packed back
//! to back, so no padding is computed). Either way only the positions that predict a completion token
//! go through the LM head.

use burn::tensor::{Int, Tensor, TensorData, backend::AutodiffBackend, backend::Backend};
use prefer_kernels::SeqLayout;

/// How the rows of a batch are laid out for the model (`padding_free`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Packing {
    /// `[2P, T]`, each row right-padded to the longest (TRL's default).
    #[default]
    Padded,
    /// `[1, N]`: the rows' real tokens back to back, attention kept within each row (TRL's
    /// `padding_free`).
    PaddingFree,
}

/// A batch on the host, row-major `[2P, T]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBatch {
    /// Ids, padded with the pad id.
    pub input_ids: Vec<i64>,
    /// 1 for tokens, 0 for padding.
    pub attention_mask: Vec<i64>,
    /// 1 for completion tokens.
    pub completion_mask: Vec<i64>,
    /// `[2P, T]`.
    pub shape: [usize; 2],
    /// KTO examples' labels (desirable or not), one per pair; empty for preference pairs.
    pub labels: Vec<bool>,
}

/// A batch on a device, ready for the model and the LM head.
#[derive(Debug, Clone)]
pub struct DpoBatch<B: Backend> {
    /// The ids the model runs on: `[2P, T]` (padded) or `[1, N]` (padding-free).
    pub input_ids: Tensor<B, 2, Int>,
    /// How those token rows split into sequences.
    pub layout: SeqLayout,
    /// Indices into the model's flattened output of the positions that predict a completion token.
    pub picks: Tensor<B, 1, Int>,
    /// The completion tokens those positions predict.
    pub targets: Tensor<B, 1, Int>,
    /// For every slot of `[2P, T − 1]`: its index among `picks`, or `picks`' length (a zero) where
    /// the next token is not a completion token.
    pub unpack: Tensor<B, 1, Int>,
    /// 1 where the next token is a completion token, `[2P, T − 1]`.
    pub mask: Tensor<B, 2>,
    /// The positions of the chosen rows that predict a prompt token (ORPO's NLL counts the prompt).
    pub prompt_picks: Tensor<B, 1, Int>,
    /// The prompt tokens those positions predict.
    pub prompt_targets: Tensor<B, 1, Int>,
    /// The pair each of those positions belongs to.
    pub prompt_pairs: Tensor<B, 1, Int>,
    /// Real tokens (prompts and completions, no padding).
    pub tokens: usize,
    /// Tokens the model computes (with padding, when padded).
    pub computed_tokens: usize,
    /// KTO examples' labels, one per pair (the host's copy); empty for preference pairs.
    pub labels: Vec<bool>,
}

impl HostBatch {
    /// Number of pairs.
    pub fn pairs(&self) -> usize {
        self.shape[0] / 2
    }

    /// Real tokens of each row.
    pub fn lengths(&self) -> Vec<usize> {
        let t = self.shape[1].max(1);
        self.attention_mask
            .chunks(t)
            .map(|r| r.iter().filter(|&&m| m != 0).count())
            .collect()
    }

    /// Uploads to a device in the given layout.
    pub fn to_device<B: Backend>(&self, device: &B::Device, packing: Packing) -> DpoBatch<B> {
        let [n, t] = self.shape;
        let lengths = self.lengths();
        let (ids, ids_shape, layout, start): (Vec<i64>, [usize; 2], SeqLayout, Vec<usize>) =
            match packing {
                Packing::Padded => (
                    self.input_ids.clone(),
                    self.shape,
                    SeqLayout::uniform(n, t),
                    (0..n).map(|r| r * t).collect(),
                ),
                Packing::PaddingFree => {
                    let ids: Vec<i64> = self
                        .input_ids
                        .chunks(t.max(1))
                        .zip(&lengths)
                        .flat_map(|(row, &l)| row[..l].iter().copied())
                        .collect();
                    let layout = SeqLayout::packed(&lengths);
                    let start = (0..n).map(|r| layout.range(r).start).collect();
                    let len = ids.len();
                    (ids, [1, len], layout, start)
                }
            };
        let tm1 = t.saturating_sub(1);
        let (mut picks, mut targets) = (Vec::new(), Vec::new());
        let mut slots = vec![usize::MAX; n * tm1];
        let mut mask = vec![0f32; n * tm1];
        for r in 0..n {
            for j in 0..tm1.min(lengths[r].saturating_sub(1)) {
                if self.completion_mask[r * t + j + 1] != 0 {
                    slots[r * tm1 + j] = picks.len();
                    mask[r * tm1 + j] = 1.0;
                    picks.push((start[r] + j) as i64);
                    targets.push(self.input_ids[r * t + j + 1]);
                }
            }
        }
        let (mut prompt_picks, mut prompt_targets, mut prompt_pairs) =
            (Vec::new(), Vec::new(), Vec::new());
        for r in 0..n / 2 {
            for j in 0..tm1.min(lengths[r].saturating_sub(1)) {
                if self.completion_mask[r * t + j + 1] == 0 {
                    prompt_picks.push((start[r] + j) as i64);
                    prompt_targets.push(self.input_ids[r * t + j + 1]);
                    prompt_pairs.push(r as i64);
                }
            }
        }
        let zero_slot = picks.len();
        let unpack: Vec<i64> = slots
            .into_iter()
            .map(|s| if s == usize::MAX { zero_slot } else { s } as i64)
            .collect();
        let ints = |v: Vec<i64>| {
            let n = v.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(v, [n]), device)
        };
        DpoBatch {
            input_ids: Tensor::from_data(TensorData::new(ids, ids_shape), device),
            computed_tokens: layout.tokens(),
            layout,
            picks: ints(picks),
            targets: ints(targets),
            unpack: ints(unpack),
            mask: Tensor::from_data(TensorData::new(mask, [n, tm1]), device),
            prompt_picks: ints(prompt_picks),
            prompt_targets: ints(prompt_targets),
            prompt_pairs: ints(prompt_pairs),
            tokens: lengths.iter().sum(),
            labels: self.labels.clone(),
        }
    }
}

impl<B: Backend> DpoBatch<B> {
    /// Number of pairs.
    pub fn pairs(&self) -> usize {
        self.mask.dims()[0] / 2
    }

    /// Completion tokens the LM head scores.
    pub fn completion_tokens(&self) -> usize {
        self.picks.dims()[0]
    }
}

impl<B: AutodiffBackend> DpoBatch<B> {
    /// The same batch on the inner (non-autodiff) backend.
    pub fn inner(&self) -> DpoBatch<B::InnerBackend> {
        DpoBatch {
            input_ids: self.input_ids.clone().inner(),
            layout: self.layout.clone(),
            picks: self.picks.clone().inner(),
            targets: self.targets.clone().inner(),
            unpack: self.unpack.clone().inner(),
            mask: self.mask.clone().inner(),
            prompt_picks: self.prompt_picks.clone().inner(),
            prompt_targets: self.prompt_targets.clone().inner(),
            prompt_pairs: self.prompt_pairs.clone().inner(),
            tokens: self.tokens,
            computed_tokens: self.computed_tokens,
            labels: self.labels.clone(),
        }
    }
}
