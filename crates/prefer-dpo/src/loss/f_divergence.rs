//! f-DPO (Wang et al. 2023, "Beyond Reverse KL"): the divergence that regularises the policy
//! towards the reference decides how a log-ratio `u = log π/π_ref` enters the loss, as `f'(e^u)`.
//! Reverse KL (`f'(t) = log t`) is standard DPO; TRL 1.16's `f_divergence_type` offers three more
//! for the losses built on the log-ratio difference.

use burn::tensor::{Tensor, activation::log_sigmoid, backend::Backend};
use serde::{Deserialize, Serialize};

use super::LossType;

/// TRL's `f_divergence_type`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FDivergenceType {
    /// `f'(t) = log t`: the log-ratio itself (standard DPO).
    #[default]
    ReverseKl,
    /// `f'(t) = 1 − 1/t`.
    ForwardKl,
    /// Jensen–Shannon: `f'(t) = log(2t / (t + 1)) = log 2 + log σ(log t)`.
    JsDivergence,
    /// α-divergence: `f'(t) = (t^(α−1) − 1) / (α − 1)`, α = `f_alpha_divergence_coef`.
    AlphaDivergence,
}

/// The divergence with its parameter.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct FDivergence {
    /// Which divergence.
    pub kind: FDivergenceType,
    /// α of the α-divergence (`f_alpha_divergence_coef`, 0.5).
    pub alpha: f64,
}

impl FDivergence {
    /// Whether `loss` is built on the scores this divergence makes (TRL's list); the others use the
    /// log-ratios and take only reverse KL.
    pub fn applies_to(loss: LossType) -> bool {
        use LossType::*;
        matches!(
            loss,
            Sigmoid | SigmoidNorm | Hinge | Ipo | ExoPair | Robust | Discopop | Sft
        )
    }

    /// `f'(exp(u))` of each log-ratio `u`.
    pub fn scores<B: Backend>(&self, u: Tensor<B, 1>) -> Tensor<B, 1> {
        match self.kind {
            FDivergenceType::ReverseKl => u,
            FDivergenceType::ForwardKl => u.neg().exp().neg() + 1.0,
            FDivergenceType::JsDivergence => log_sigmoid(u) + std::f64::consts::LN_2,
            // α → 1 is reverse KL, the limit TRL falls back to.
            FDivergenceType::AlphaDivergence if (self.alpha - 1.0).abs() < 1e-6 => u,
            FDivergenceType::AlphaDivergence => {
                let a = self.alpha - 1.0;
                // TRL clamps the exponent so that it stays finite in float32.
                ((u * a).clamp_max(80.0).exp() - 1.0) / a
            }
        }
    }
}
