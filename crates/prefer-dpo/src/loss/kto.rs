//! KTO for unpaired examples, each desirable or undesirable (TRL's `KTOTrainer`, `loss_type="kto"`).

use burn::tensor::{Tensor, activation::sigmoid, backend::Backend};

/// KTO's weights and strength.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KtoConfig {
    /// β.
    pub beta: f64,
    /// Weight of desirable examples.
    pub desirable_weight: f64,
    /// Weight of undesirable examples.
    pub undesirable_weight: f64,
}

impl Default for KtoConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
        }
    }
}

/// The reference point: `max(0, mean(policy − reference))` over mismatched (prompt, completion)
/// pairs, detached.
pub fn kto_kl<B: Backend>(
    policy_kl_logps: Tensor<B, 1>,
    ref_kl_logps: Tensor<B, 1>,
) -> Tensor<B, 1> {
    (policy_kl_logps - ref_kl_logps)
        .mean()
        .clamp_min(0.0)
        .detach()
}

/// Mean KTO loss: desirable `w_d·(1 − σ(β(c − KL)))`, undesirable `w_u·(1 − σ(β(KL − r)))`, where
/// `c`/`r` are the examples' log-ratios (policy − reference sums).
pub fn kto_loss<B: Backend>(
    config: &KtoConfig,
    desirable_logratios: Tensor<B, 1>,
    undesirable_logratios: Tensor<B, 1>,
    kl: Tensor<B, 1>,
) -> Tensor<B, 1> {
    let b = config.beta;
    let nd = desirable_logratios.dims()[0];
    let nu = undesirable_logratios.dims()[0];
    let d = (sigmoid((desirable_logratios - kl.clone().expand([nd])) * b).neg() + 1.0)
        * config.desirable_weight;
    let u = (sigmoid((kl.expand([nu]) - undesirable_logratios) * b).neg() + 1.0)
        * config.undesirable_weight;
    Tensor::cat(vec![d, u], 0).mean()
}
