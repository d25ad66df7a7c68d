//! The per-pair formulas. `c`/`r` are the chosen/rejected log-ratios (policy − reference sums) —
//! through the f-divergence's `f'(exp(·))` for the losses it applies to — `h = c − r`, β the
//! strength and ε the label smoothing, as in `trl/trainer/dpo_trainer.py`.

use burn::tensor::{
    Tensor,
    activation::{log_sigmoid, relu, sigmoid},
    backend::Backend,
};

use super::{FDivergence, LossConfig, LossType, PairLogps};

/// `−(1−ε)·log σ(x) − ε·log σ(−x)`: the conservative (label-smoothed) logistic loss.
fn smoothed_logistic<B: Backend>(x: Tensor<B, 1>, eps: f64) -> Tensor<B, 1> {
    let clean = log_sigmoid(x.clone()).neg();
    if eps == 0.0 {
        clean
    } else {
        clean * (1.0 - eps) - log_sigmoid(x.neg()) * eps
    }
}

/// The loss of each pair, `[P]` (for `sft`, the batch value repeated).
pub fn per_pair_loss<B: Backend>(t: LossType, cfg: &LossConfig, x: &PairLogps<B>) -> Tensor<B, 1> {
    let (beta, eps) = (cfg.beta, cfg.label_smoothing);
    let (mut c, mut r) = (
        x.chosen.clone() - x.ref_chosen.clone(),
        x.rejected.clone() - x.ref_rejected.clone(),
    );
    if FDivergence::applies_to(t) {
        (c, r) = (cfg.f_divergence.scores(c), cfg.f_divergence.scores(r));
    }
    let h = c.clone() - r.clone();
    let length_normalised =
        || c.clone() / x.chosen_tokens.clone() - r.clone() / x.rejected_tokens.clone();
    match t {
        // TRL ≤ 1.13 and the DPO paper; TRL 1.16 ignores ε here (identical when ε = 0).
        LossType::Sigmoid => smoothed_logistic(h * beta, eps),
        LossType::Hinge => relu((h * beta).neg() + 1.0),
        LossType::Ipo => (length_normalised() - 1.0 / (2.0 * beta)).powi_scalar(2),
        LossType::ExoPair => {
            let z = h * beta;
            let (qw, ql) = (sigmoid(z.clone()), sigmoid(z.clone().neg()));
            qw * (log_sigmoid(z.clone()) - (1.0 - eps).ln())
                + ql * (log_sigmoid(z.neg()) - eps.ln())
        }
        LossType::NcaPair => {
            let (cr, rr) = (c * beta, r * beta);
            log_sigmoid(cr.clone()).neg()
                - log_sigmoid(cr.neg()) * 0.5
                - log_sigmoid(rr.neg()) * 0.5
        }
        LossType::Robust => {
            let z = h * beta;
            (log_sigmoid(z.clone()) * -(1.0 - eps) + log_sigmoid(z.neg()) * eps) / (1.0 - 2.0 * eps)
        }
        LossType::BcoPair => log_sigmoid(c * beta).neg() - log_sigmoid((r * beta).neg()),
        LossType::SppoHard => (c - 0.5 / beta).powi_scalar(2) + (r + 0.5 / beta).powi_scalar(2),
        LossType::Aot => {
            let policy = (x.chosen.clone() - x.rejected.clone()).sort(0);
            let reference = (x.ref_chosen.clone() - x.ref_rejected.clone()).sort(0);
            smoothed_logistic((policy - reference) * beta, eps)
        }
        LossType::AotUnpaired => smoothed_logistic((c.sort(0) - r.sort(0)) * beta, eps),
        LossType::ApoZero => sigmoid(c * beta).neg() + 1.0 + sigmoid(r * beta),
        LossType::ApoDown => sigmoid(c * beta) + 1.0 - sigmoid(h * beta),
        LossType::Discopop => {
            let z = h * beta;
            let m = sigmoid(z.clone() / cfg.discopop_tau);
            log_sigmoid(z.clone()).neg() * (m.clone().neg() + 1.0) + z.neg().exp() * m
        }
        LossType::Sft => {
            let nll = x.chosen_unweighted.clone().sum().neg() / x.chosen_tokens.clone().sum();
            nll.expand([x.chosen.dims()[0]])
        }
        LossType::SigmoidNorm => log_sigmoid(length_normalised() * beta).neg(),
        // Validation keeps KTO's losses to method kto, whose loss is per example (`kto_losses`).
        LossType::Kto | LossType::ApoZeroUnpaired => {
            unreachable!("KTO's loss types are validated to method kto")
        }
    }
}
