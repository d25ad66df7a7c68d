//! Per-sequence log-probabilities of completions: the model's hidden states, the LM head, a log-softmax
//! and the target token's log-prob, summed over the completion tokens of each row.

use burn::tensor::{IndexingUpdateOp, Tensor, backend::Backend};
use prefer_kernels::{DEFAULT_CHUNK, PreferBackend, fused_lm_head};
use prefer_llama::{LinearLayer, LlamaModel};

use crate::data::DpoBatch;

/// Per-row results of one forward pass, `[2P]` each.
#[derive(Debug, Clone)]
pub struct SequenceLogps<B: Backend> {
    /// Sum of the completion tokens' log-probs (differentiable).
    pub sums: Tensor<B, 1>,
    /// Each completion token's log-prob at the position before it, `[2P, T − 1]`, 0 elsewhere
    /// (differentiable).
    pub token_logps: Tensor<B, 2>,
    /// 1 where the next token is a completion token `[2P, T − 1]`.
    pub mask: Tensor<B, 2>,
    /// Number of completion tokens.
    pub tokens: Tensor<B, 1>,
    /// Sum over completion tokens of the mean logit over the vocabulary (for `logits/*`; not
    /// differentiable).
    pub logit_sums: Tensor<B, 1>,
    /// `log Σ_v p_v²` of each completion token's predicted distribution, `[2P, T − 1]`, 0
    /// elsewhere (not differentiable); only when asked for with [`LogpsExtras`] (WPO's weights).
    pub log_sum_sq_probs: Option<Tensor<B, 2>>,
    /// Per pair, the log-prob sum over the chosen sequence's prompt tokens (from the second) and
    /// their number, `[P]` each (differentiable); only when asked for with [`LogpsExtras`] (ORPO's
    /// NLL).
    pub chosen_prompt: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
}

/// Per-token quantities beyond the log-probs that a caller can ask [`sequence_logps_with`] for;
/// each costs extra compute, so none is on by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogpsExtras {
    /// `log Σ_v p_v²` per completion token (WPO, `use_weighting`): one more pass of the LM head
    /// over the completion positions, forward only.
    pub log_sum_sq_probs: bool,
    /// The chosen sequences' prompt-token log-probs (ORPO's NLL counts the prompt): one more pass
    /// of the LM head over those positions, with gradients.
    pub chosen_prompt_logps: bool,
}

impl<B: Backend> SequenceLogps<B> {
    /// The sequence log-probs the losses take: the plain sums, or with LD-DPO's `ld_alpha` (Liu et
    /// al. 2024, "Length Desensitization") each pair's tokens past its shorter completion weighted
    /// by alpha, so a longer answer earns no log-prob for its length alone. Rows are
    /// `[chosen.., rejected..]`.
    pub fn logps(&self, ld_alpha: Option<f64>) -> Tensor<B, 1> {
        let Some(alpha) = ld_alpha else {
            return self.sums.clone();
        };
        let [n, t] = self.mask.dims();
        // The position of each completion token within its completion, from 1.
        let position = self.mask.clone().cumsum(1);
        let (chosen_len, rejected_len) = Self::split(self.tokens.clone());
        let shared = chosen_len.min_pair(rejected_len);
        let shared = Tensor::cat(vec![shared.clone(), shared], 0)
            .reshape([n, 1])
            .expand([n, t]);
        let tail = position.greater(shared).float();
        let weights = tail * (alpha - 1.0) + 1.0;
        (self.token_logps.clone() * weights).sum_dim(1).reshape([n])
    }

    /// Splits `[chosen.., rejected..]` rows into the two halves.
    pub fn split(t: Tensor<B, 1>) -> (Tensor<B, 1>, Tensor<B, 1>) {
        let n = t.dims()[0] / 2;
        (t.clone().narrow(0, 0, n), t.narrow(0, n, n))
    }
}

/// Log-probs of every row's completion under `model`.
pub fn sequence_logps<B: PreferBackend, L: LinearLayer<B>>(
    model: &LlamaModel<B, L>,
    batch: &DpoBatch<B>,
) -> SequenceLogps<B> {
    sequence_logps_with(model, batch, LogpsExtras::default())
}

/// Log-probs of every row's completion under `model`, with the `extras` asked for.
///
/// Position `t` predicts token `t + 1`, so the completion mask is shifted by one, as in TRL. Only the
/// positions that predict a completion token go through the fused LM head (chunks of the vocabulary
/// through the selective log-softmax, a kernel on wgpu and CUDA), so neither the `[batch, time,
/// vocab]` logits nor their log-softmax are ever built, and prompt and padding positions cost
/// nothing there.
pub fn sequence_logps_with<B: PreferBackend, L: LinearLayer<B>>(
    model: &LlamaModel<B, L>,
    batch: &DpoBatch<B>,
    extras: LogpsExtras,
) -> SequenceLogps<B> {
    let [n, tm1] = batch.mask.dims();
    let hidden = match batch.layout.uniform_len() {
        Some(len) if batch.input_ids.dims() == [n, len] => {
            model.forward_hidden(batch.input_ids.clone(), None, None)
        }
        _ => model.forward_packed(batch.input_ids.clone(), &batch.layout),
    };
    let [b, t, h] = hidden.dims();
    let device = hidden.device();
    let hidden = hidden.reshape([b * t, h]);
    let chosen_prompt = extras
        .chosen_prompt_logps
        .then(|| chosen_prompt_logps(hidden.clone(), model.lm_head_weight(), batch));
    let picked = batch.completion_tokens();
    let zeros = || Tensor::<B, 2>::zeros([n, tm1], &device);
    let (token_logps, mean_logits, log_sum_sq_probs) = if picked == 0 {
        let extra = extras.log_sum_sq_probs.then(zeros);
        (zeros(), zeros(), extra)
    } else {
        let hidden = hidden.select(0, batch.picks.clone());
        let weight = model.lm_head_weight();
        let out = fused_lm_head(
            hidden.clone(),
            weight.clone(),
            batch.targets.clone(),
            DEFAULT_CHUNK,
        );
        // Back to `[rows, T − 1]`, with 0 wherever the next token is not a completion token.
        let unpack = |x: Tensor<B, 1>| {
            Tensor::cat(vec![x, Tensor::zeros([1], &device)], 0)
                .select(0, batch.unpack.clone())
                .reshape([n, tm1])
        };
        let extra = extras
            .log_sum_sq_probs
            .then(|| unpack(log_sum_sq_probs(hidden, weight, out.lse.clone())));
        (unpack(out.logp), unpack(out.mean_logit), extra)
    };
    let mask = batch.mask.clone();
    SequenceLogps {
        sums: token_logps.clone().sum_dim(1).reshape([n]),
        token_logps,
        tokens: mask.clone().sum_dim(1).reshape([n]),
        logit_sums: mean_logits.sum_dim(1).reshape([n]),
        mask,
        log_sum_sq_probs,
        chosen_prompt,
    }
}

/// Per pair, the log-prob sum over the positions of the chosen row that predict a prompt token,
/// and their number: `hidden` is the model's output flattened to `[rows × T, H]`.
fn chosen_prompt_logps<B: PreferBackend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    batch: &DpoBatch<B>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let device = hidden.device();
    let zeros = Tensor::<B, 1>::zeros([batch.pairs()], &device);
    let picked = batch.prompt_picks.dims()[0];
    if picked == 0 {
        return (zeros.clone(), zeros);
    }
    let hidden = hidden.select(0, batch.prompt_picks.clone());
    let out = fused_lm_head(hidden, weight, batch.prompt_targets.clone(), DEFAULT_CHUNK);
    let add = |values| {
        zeros
            .clone()
            .select_assign(0, batch.prompt_pairs.clone(), values, IndexingUpdateOp::Add)
    };
    (add(out.logp), add(Tensor::ones([picked], &device)))
}

/// Rows of logits built at a time by [`log_sum_sq_probs`]: about 16 M values whatever the
/// vocabulary, so the extra memory stays bounded.
const LOGIT_BUDGET: usize = 1 << 24;

/// `log Σ_v p_v² = logsumexp(2z) − 2·logsumexp(z)` of each row of `hidden` `[N, H]` under the
/// output `weight` `[V, H]`, given `lse = logsumexp(z)` from the fused LM head; forward only, a
/// block of rows at a time.
fn log_sum_sq_probs<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    lse: Tensor<B, 1>,
) -> Tensor<B, 1> {
    let [rows, _] = hidden.dims();
    let [vocab, _] = weight.dims();
    let (hidden, weight_t) = (hidden.detach(), weight.detach().transpose());
    let block = (LOGIT_BUDGET / vocab.max(1)).max(1);
    let lse2: Vec<Tensor<B, 1>> = (0..rows)
        .step_by(block)
        .map(|start| {
            let len = block.min(rows - start);
            let doubled = hidden
                .clone()
                .narrow(0, start, len)
                .matmul(weight_t.clone())
                * 2.0;
            let max = doubled.clone().max_dim(1);
            let sum = (doubled - max.clone()).exp().sum_dim(1);
            (sum.log() + max).reshape([len])
        })
        .collect();
    Tensor::cat(lse2, 0) - lse.detach() * 2.0
}
