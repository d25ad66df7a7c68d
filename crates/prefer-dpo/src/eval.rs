//! Evaluating a policy against a reference on preference pairs: losses and TRL's metrics.

use burn::tensor::{Tensor, backend::Backend};
use prefer_llama::{LinearLayer, LlamaModel};

use crate::{
    logps::{DpoBatch, SequenceLogps, sequence_logps},
    loss::{LossConfig, PairLogps, dpo_loss},
    metrics::PairRecords,
};

/// The loss of one batch and its per-pair values.
#[derive(Debug, Clone)]
pub struct BatchEval<B: Backend> {
    /// The (weighted) loss, one element; differentiable with respect to the policy.
    pub loss: Tensor<B, 1>,
    /// The per-pair inputs of the loss.
    pub pairs: PairLogps<B>,
    /// Policy log-prob results (for `logits/*`).
    pub policy: SequenceLogps<B>,
}

/// Computes the loss of `batch` with `policy`, taking the reference log-probs from `reference`.
pub fn evaluate_batch<B: Backend, L: LinearLayer<B>>(
    config: &LossConfig,
    policy: &LlamaModel<B, L>,
    reference: &LlamaModel<B, L>,
    batch: &DpoBatch<B>,
) -> BatchEval<B> {
    let pol = sequence_logps(policy, batch);
    let reference = sequence_logps(reference, batch);
    let (chosen, rejected) = SequenceLogps::split(pol.sums.clone());
    let (ref_chosen, ref_rejected) = SequenceLogps::split(reference.sums.detach());
    let (chosen_tokens, rejected_tokens) = SequenceLogps::split(pol.tokens.clone());
    let pairs = PairLogps {
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        chosen_tokens,
        rejected_tokens,
    };
    BatchEval {
        loss: dpo_loss(config, &pairs),
        pairs,
        policy: pol,
    }
}

fn host<B: Backend>(t: Tensor<B, 1>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().unwrap_or_default()
}

impl<B: Backend> BatchEval<B> {
    /// The per-pair values on the host, for metrics.
    pub fn records(&self) -> PairRecords {
        let (cl, rl) = SequenceLogps::split(self.policy.logit_sums.clone());
        let p = &self.pairs;
        PairRecords {
            chosen: host(p.chosen.clone()),
            rejected: host(p.rejected.clone()),
            ref_chosen: host(p.ref_chosen.clone()),
            ref_rejected: host(p.ref_rejected.clone()),
            chosen_tokens: host(p.chosen_tokens.clone()),
            rejected_tokens: host(p.rejected_tokens.clone()),
            chosen_logit_sums: host(cl),
            rejected_logit_sums: host(rl),
        }
    }
}
