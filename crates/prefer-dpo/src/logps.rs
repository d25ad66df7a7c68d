//! Per-sequence log-probabilities of completions: the model's hidden states, the LM head, a log-softmax
//! and the target token's log-prob, summed over the completion tokens of each row.

use burn::tensor::{Int, Tensor, backend::Backend};
use prefer_kernels::{SelectiveLogSoftmaxBackend, selective_log_softmax};
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
/// target log-probs come from the selective log-softmax extension (a kernel on wgpu and CUDA), so
/// no `[batch, time, vocab]` log-softmax is built.
pub fn sequence_logps<B: SelectiveLogSoftmaxBackend, L: LinearLayer<B>>(
    model: &LlamaModel<B, L>,
    batch: &DpoBatch<B>,
) -> SequenceLogps<B> {
    let [n, t] = batch.input_ids.dims();
    let hidden = model.forward_hidden(
        batch.input_ids.clone(),
        Some(batch.attention_mask.clone()),
        None,
    );
    let logits = model.logits(hidden.narrow(1, 0, t - 1)); // [n, t-1, V]
    let vocab = logits.dims()[2];
    let targets = batch
        .input_ids
        .clone()
        .narrow(1, 1, t - 1)
        .reshape([n * (t - 1)]);
    let mask = batch.completion_mask.clone().narrow(1, 1, t - 1);
    let mean_logits = logits.clone().detach().mean_dim(2).reshape([n, t - 1]);
    let token_logps =
        selective_log_softmax(logits.reshape([n * (t - 1), vocab]), targets).reshape([n, t - 1]);
    SequenceLogps {
        sums: (token_logps * mask.clone()).sum_dim(1).reshape([n]),
        tokens: mask.clone().sum_dim(1).reshape([n]),
        logit_sums: (mean_logits * mask).sum_dim(1).reshape([n]),
    }
}
