//! WPO (Zhou et al. 2024, "Weighted Preference Optimization", eq. 2; TRL's `use_weighting`):
//! each pair's loss is scaled by how likely the policy is to have produced the pair itself, so
//! off-policy pairs count less. A completion's weight is the exponent of the mean over its
//! tokens of `log p(token) − log Σ_v p_v²`: the token's probability relative to the expected
//! probability of a sample from the same distribution, which keeps the weight from shrinking
//! with the entropy of the model. The pair's weight is the product of its two completions' and
//! is not differentiated.

use burn::tensor::{Tensor, backend::Backend};

use crate::logps::SequenceLogps;

/// Each pair's weight `[P]`, from the policy's log-probs of a batch `[chosen.., rejected..]`
/// computed with `log_sum_sq_probs`; `None` when they were not.
pub fn wpo_weights<B: Backend>(policy: &SequenceLogps<B>) -> Option<Tensor<B, 1>> {
    let log_sum_sq = policy.log_sum_sq_probs.clone()?;
    let [n, _] = policy.mask.dims();
    let aligned = (policy.token_logps.clone().detach() - log_sum_sq) * policy.mask.clone();
    // TRL divides by the completion length clamped at 1, so an empty completion weighs 1.
    let mean = aligned.sum_dim(1).reshape([n]) / policy.tokens.clone().clamp_min(1.0);
    let (chosen, rejected) = SequenceLogps::split(mean);
    Some((chosen + rejected).exp())
}
