//! KTO on unpaired examples, each desirable or undesirable (TRL's `KTOTrainer`, `loss_type="kto"`):
//! each example's log-ratio is compared with a reference point, the policy's estimated KL from the
//! reference on mismatched (prompt, completion) pairs.

use burn::tensor::{Tensor, activation::sigmoid, backend::Backend};

use super::{LossConfig, LossType};

/// The reference point: `max(0, mean(policy − reference))` over the batch's KL completions (each
/// prompt with another example's completion), detached — TRL computes it without gradients.
pub fn kto_kl<B: Backend>(
    policy_kl_logps: Tensor<B, 1>,
    ref_kl_logps: Tensor<B, 1>,
) -> Tensor<B, 1> {
    (policy_kl_logps.detach() - ref_kl_logps)
        .mean()
        .clamp_min(0.0)
        .detach()
}

/// Whether `config`'s KTO loss compares with the KL estimate (`kto`; `apo_zero_unpaired` does not).
pub fn uses_kl(config: &LossConfig) -> bool {
    config.loss_types.first() != Some(&LossType::ApoZeroUnpaired)
}

/// Each example's KTO loss, `[N]`: desirable `w_d·(1 − σ(β(ρ − KL)))`, undesirable
/// `w_u·(1 − σ(β(KL − ρ)))`, where `ρ` is the example's log-ratio (policy − reference sums),
/// `kl` the batch's reference point (one element) and `desirable` 1 or 0 per example; with
/// `apo_zero_unpaired`, the same with KL = 0. The batch's loss is their mean (TRL's mean over the
/// concatenated desirable and undesirable losses).
pub fn kto_losses<B: Backend>(
    config: &LossConfig,
    logratios: Tensor<B, 1>,
    kl: Tensor<B, 1>,
    desirable: Tensor<B, 1>,
) -> Tensor<B, 1> {
    let n = logratios.dims()[0];
    let kl = if uses_kl(config) { kl } else { kl.zeros_like() };
    let z = (logratios - kl.expand([n])) * config.beta;
    let d = (sigmoid(z.clone()).neg() + 1.0) * config.desirable_weight;
    let u = (sigmoid(z.neg()).neg() + 1.0) * config.undesirable_weight;
    d * desirable.clone() + u * (desirable.neg() + 1.0)
}
