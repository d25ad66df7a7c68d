//! Per-sequence log-probabilities of completions: the model's hidden states, the LM head, a log-softmax
//! and the target token's log-prob, summed over the completion tokens of each row.

use burn::tensor::{Int, Tensor, backend::Backend};
use prefer_kernels::{DEFAULT_CHUNK, PreferBackend, fused_lm_head};
use prefer_llama::{LinearLayer, LlamaModel};

/// A tokenised batch of pairs: rows `[chosen_0 .. chosen_{P-1}, rejected_0 .. rejected_{P-1}]`,
/// right-padded.
#[derive(Debug, Clone)]
pub struct DpoBatch<B: Backend> {
    /// Prompt + completion ids `[2P, T]`.
    pub input_ids: Tensor<B, 2, Int>,
    /// 1 for real tokens, 0 for padding `[2P, T]`.
    pub attention_mask: Tensor<B, 2, Int>,
    /// 1 for completion tokens `[2P, T]` (float, to weight log-probs).
    pub completion_mask: Tensor<B, 2>,
}

impl<B: Backend> DpoBatch<B> {
    /// Number of pairs.
    pub fn pairs(&self) -> usize {
        self.input_ids.dims()[0] / 2
    }
}

/// Per-row results of one forward pass, `[2P]` each.
#[derive(Debug, Clone)]
pub struct SequenceLogps<B: Backend> {
    /// Sum of the completion tokens' log-probs (differentiable).
    pub sums: Tensor<B, 1>,
    /// Every position's log-prob of the next token `[2P, T − 1]` (differentiable; use with `mask`).
    pub token_logps: Tensor<B, 2>,
    /// 1 where the next token is a completion token `[2P, T − 1]`.
    pub mask: Tensor<B, 2>,
    /// Number of completion tokens.
    pub tokens: Tensor<B, 1>,
    /// Sum over completion tokens of the mean logit over the vocabulary (for `logits/*`; detached).
    pub logit_sums: Tensor<B, 1>,
}

impl<B: Backend> SequenceLogps<B> {
    /// Splits `[chosen.., rejected..]` rows into the two halves.
    pub fn split(t: Tensor<B, 1>) -> (Tensor<B, 1>, Tensor<B, 1>) {
        let n = t.dims()[0] / 2;
        (t.clone().narrow(0, 0, n), t.narrow(0, n, n))
    }
}

/// Log-probs of every row's completion under `model`.
///
/// Position `t` predicts token `t + 1`, so the completion mask is shifted by one, as in TRL. The
/// target log-probs come from the fused LM head (chunks of the vocabulary through the selective
/// log-softmax, a kernel on wgpu and CUDA), so neither the `[batch, time, vocab]` logits nor their
/// log-softmax are ever built.
pub fn sequence_logps<B: PreferBackend, L: LinearLayer<B>>(
    model: &LlamaModel<B, L>,
    batch: &DpoBatch<B>,
) -> SequenceLogps<B> {
    let [n, t] = batch.input_ids.dims();
    let hidden = model.forward_hidden(
        batch.input_ids.clone(),
        Some(batch.attention_mask.clone()),
        None,
    );
    let h = hidden.dims()[2];
    let hidden = hidden.narrow(1, 0, t - 1).reshape([n * (t - 1), h]);
    let targets = batch
        .input_ids
        .clone()
        .narrow(1, 1, t - 1)
        .reshape([n * (t - 1)]);
    let mask = batch.completion_mask.clone().narrow(1, 1, t - 1);
    let out = fused_lm_head(hidden, model.lm_head_weight(), targets, DEFAULT_CHUNK);
    let token_logps = out.logp.reshape([n, t - 1]);
    let mean_logits = out.mean_logit.reshape([n, t - 1]);
    SequenceLogps {
        sums: (token_logps.clone() * mask.clone()).sum_dim(1).reshape([n]),
        token_logps,
        tokens: mask.clone().sum_dim(1).reshape([n]),
        logit_sums: (mean_logits * mask.clone()).sum_dim(1).reshape([n]),
        mask,
    }
}
