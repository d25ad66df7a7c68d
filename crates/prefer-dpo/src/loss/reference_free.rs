//! Losses without a reference model, on length-normalised (per-token mean) log-probs: SimPO
//! (CPO's `simpo` loss) and ORPO's odds-ratio term.

use burn::tensor::{Tensor, activation::log_sigmoid, backend::Backend};

/// SimPO per pair: `−(1−ε)·log σ(β·(Δ − γ/β)) − ε·log σ(−β·(Δ − γ/β))` with
/// `Δ = mean log p(chosen) − mean log p(rejected)` (TRL's `CPOTrainer`, `loss_type="simpo"`).
/// CPO's optional NLL term (`cpo_alpha`) is added by the caller.
pub fn simpo_loss<B: Backend>(
    chosen_avg: Tensor<B, 1>,
    rejected_avg: Tensor<B, 1>,
    beta: f64,
    gamma: f64,
    label_smoothing: f64,
) -> Tensor<B, 1> {
    let z = (chosen_avg - rejected_avg - gamma / beta) * beta;
    log_sigmoid(z.clone()) * -(1.0 - label_smoothing) - log_sigmoid(z.neg()) * label_smoothing
}

/// ORPO's log odds ratio per pair: `log(p_c/(1−p_c)) − log(p_r/(1−p_r))` on mean token log-probs.
pub fn orpo_log_odds<B: Backend>(
    chosen_avg: Tensor<B, 1>,
    rejected_avg: Tensor<B, 1>,
) -> Tensor<B, 1> {
    let log1m_exp = |x: Tensor<B, 1>| x.exp().neg().log1p();
    (chosen_avg.clone() - rejected_avg.clone()) - (log1m_exp(chosen_avg) - log1m_exp(rejected_avg))
}

/// ORPO: `nll − β·mean(log σ(log odds))`. TRL's `ORPOTrainer` takes `nll` as the mean cross-entropy
/// over every non-padding token of the chosen sequences, prompt included.
pub fn orpo_loss<B: Backend>(nll: Tensor<B, 1>, log_odds: Tensor<B, 1>, beta: f64) -> Tensor<B, 1> {
    nll - log_sigmoid(log_odds).mean() * beta
}
