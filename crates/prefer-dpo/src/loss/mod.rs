//! The DPO family of losses, each as TRL 1.16's `DPOTrainer` computes it from per-sequence
//! log-probability sums of the policy and the reference; several can be combined with weights.

pub mod f_divergence;
pub mod kto;
pub mod method;
mod pairwise;
pub mod reference_free;
pub mod wpo;

use std::{fmt, str::FromStr};

use burn::tensor::{Tensor, backend::Backend};

pub use f_divergence::{FDivergence, FDivergenceType};
pub use kto::{kto_kl, kto_losses};
pub use method::{
    CPO_LOSS_TYPES, Method, PolicyPairs, batch_nll, orpo_log_odds_metrics, reference_free_loss,
};
pub use pairwise::per_pair_loss;
pub use reference_free::{orpo_log_odds, orpo_loss, simpo_loss};
pub use wpo::wpo_weights;

/// A DPO-family loss, by TRL's `loss_type` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LossType {
    /// `−log σ(βh)`; with label smoothing ε > 0, conservative DPO `−(1−ε)·log σ(βh) − ε·log σ(−βh)`.
    Sigmoid,
    /// Robust DPO: unbiased under label noise ε.
    Robust,
    /// IPO on length-normalised log-ratios: `(h̄ − 1/(2β))²`.
    Ipo,
    /// SLiC hinge: `relu(1 − βh)`.
    Hinge,
    /// EXO (pairwise), needs ε > 0.
    ExoPair,
    /// NCA (pairwise).
    NcaPair,
    /// BCO (pairwise).
    BcoPair,
    /// SPPO with hard win/loss probabilities.
    SppoHard,
    /// AOT: distributional alignment of sorted paired log-ratios.
    Aot,
    /// AOT on unpaired (separately sorted) log-ratios.
    AotUnpaired,
    /// APO-zero: raise chosen, lower rejected likelihood.
    ApoZero,
    /// APO-down: lower both, rejected more.
    ApoDown,
    /// DiscoPOP: logistic/exponential blend (τ = `discopop_tau`).
    Discopop,
    /// Supervised term: mean negative log-likelihood of the chosen completion tokens.
    Sft,
    /// Sigmoid on length-normalised log-ratios.
    SigmoidNorm,
    /// KTO's loss (`method = "kto"` only): each example against the batch's KL estimate.
    Kto,
    /// KTO's unpaired APO-zero (`method = "kto"` only): desirable `1 − σ(βρ)`, undesirable
    /// `σ(βρ)`, no KL estimate.
    ApoZeroUnpaired,
}

/// The losses of TRL's `KTOConfig.loss_type`, with their names (per example, `method = "kto"`).
pub const KTO_LOSS_TYPES: [(LossType, &str); 2] = [
    (LossType::Kto, "kto"),
    (LossType::ApoZeroUnpaired, "apo_zero_unpaired"),
];

impl LossType {
    /// All pairwise losses with their TRL names (`DPOConfig.loss_type`'s).
    pub const ALL: [(LossType, &'static str); 15] = [
        (Self::Sigmoid, "sigmoid"),
        (Self::Robust, "robust"),
        (Self::Ipo, "ipo"),
        (Self::Hinge, "hinge"),
        (Self::ExoPair, "exo_pair"),
        (Self::NcaPair, "nca_pair"),
        (Self::BcoPair, "bco_pair"),
        (Self::SppoHard, "sppo_hard"),
        (Self::Aot, "aot"),
        (Self::AotUnpaired, "aot_unpaired"),
        (Self::ApoZero, "apo_zero"),
        (Self::ApoDown, "apo_down"),
        (Self::Discopop, "discopop"),
        (Self::Sft, "sft"),
        (Self::SigmoidNorm, "sigmoid_norm"),
    ];

    /// TRL's name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .chain(&KTO_LOSS_TYPES)
            .find(|(t, _)| *t == self)
            .map(|(_, n)| *n)
            .unwrap_or("?")
    }
}

impl fmt::Display for LossType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LossType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .iter()
            .chain(&KTO_LOSS_TYPES)
            .find(|(_, n)| *n == s)
            .map(|(t, _)| *t)
            .ok_or_else(|| {
                if s == "simpo" {
                    return "loss_type `simpo` is CPO's SimPO loss: set method = \"simpo\" \
                            (cpo_alpha = 1 adds CPO's NLL term)"
                        .to_string();
                }
                let names: Vec<&str> = Self::ALL.iter().map(|(_, n)| *n).collect();
                format!("unknown loss_type `{s}` (valid: {})", names.join(", "))
            })
    }
}

/// TRL's `DPOConfig` options that shape the loss.
#[derive(Debug, Clone, PartialEq)]
pub struct LossConfig {
    /// Strength of the KL regularisation (`beta`, 0.1).
    pub beta: f64,
    /// Losses to add up (`loss_type`, `["sigmoid"]`).
    pub loss_types: Vec<LossType>,
    /// Weights of the losses (`loss_weights`; all 1 when absent).
    pub loss_weights: Option<Vec<f64>>,
    /// Label smoothing ε (`label_smoothing`, 0).
    pub label_smoothing: f64,
    /// Temperature of DiscoPOP's blend (`discopop_tau`, 0.05).
    pub discopop_tau: f64,
    /// The divergence to the reference (`f_divergence_type`, reverse KL: standard DPO).
    pub f_divergence: FDivergence,
    /// LD-DPO's weight of the completion tokens past the shorter completion of a pair
    /// (`ld_alpha`; none: all tokens count fully).
    pub ld_alpha: Option<f64>,
    /// WPO: weigh each pair's loss by the policy's own probability of the pair
    /// (`use_weighting`, off).
    pub use_weighting: bool,
    /// The method: DPO or a reference-free one (`method`, `dpo`).
    pub method: Method,
    /// CPO's weight of the chosen completions' NLL (`cpo_alpha`; 1 for CPO, 0 for SimPO).
    pub cpo_alpha: f64,
    /// SimPO's target reward margin γ (`simpo_gamma`, 0.5).
    pub simpo_gamma: f64,
    /// KTO's weight of desirable examples (`desirable_weight`, 1).
    pub desirable_weight: f64,
    /// KTO's weight of undesirable examples (`undesirable_weight`, 1).
    pub undesirable_weight: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            loss_types: vec![LossType::Sigmoid],
            loss_weights: None,
            label_smoothing: 0.0,
            discopop_tau: 0.05,
            f_divergence: FDivergence {
                kind: FDivergenceType::ReverseKl,
                alpha: 0.5,
            },
            ld_alpha: None,
            use_weighting: false,
            method: Method::Dpo,
            cpo_alpha: 0.0,
            simpo_gamma: 0.5,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
        }
    }
}

impl LossConfig {
    /// Checks the options, naming the one at fault.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return Err(format!("beta must be positive (got {})", self.beta));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(format!(
                "label_smoothing must be in [0, 0.5) (got {})",
                self.label_smoothing
            ));
        }
        if self.loss_types.is_empty() {
            return Err("loss_type must name at least one loss".into());
        }
        if let Some(w) = self
            .loss_weights
            .as_ref()
            .filter(|w| w.len() != self.loss_types.len())
        {
            return Err(format!(
                "loss_weights has {} values but loss_type names {} losses",
                w.len(),
                self.loss_types.len()
            ));
        }
        if self.loss_types.contains(&LossType::ExoPair) && self.label_smoothing == 0.0 {
            return Err("loss_type exo_pair needs label_smoothing > 0".into());
        }
        if self.f_divergence.kind != FDivergenceType::ReverseKl
            && let Some(t) = self
                .loss_types
                .iter()
                .find(|t| !FDivergence::applies_to(**t))
        {
            return Err(format!(
                "f_divergence_type other than reverse_kl works with the sigmoid, sigmoid_norm, \
                 hinge, ipo, exo_pair, robust, discopop and sft losses, not `{}`",
                t.name()
            ));
        }
        if !self.f_divergence.alpha.is_finite() {
            return Err("f_alpha_divergence_coef must be a finite number".into());
        }
        if let Some(a) = self.ld_alpha
            && !(0.0..=1.0).contains(&a)
        {
            return Err(format!("ld_alpha must be in [0, 1] (got {a})"));
        }
        if self.use_weighting
            && let Some(t) = self
                .loss_types
                .iter()
                .find(|t| matches!(t, LossType::Aot | LossType::AotUnpaired))
        {
            return Err(format!(
                "use_weighting cannot be combined with loss_type `{}`: it sorts the pairs, so \
                 per-pair weights would fall on the wrong pairs",
                t.name()
            ));
        }
        method::validate_method(self)
    }
}

/// Per-sequence quantities of a batch of pairs, `[P]` each.
#[derive(Debug, Clone)]
pub struct PairLogps<B: Backend> {
    /// Policy log-prob sum over the chosen completion.
    pub chosen: Tensor<B, 1>,
    /// Policy log-prob sum over the rejected completion.
    pub rejected: Tensor<B, 1>,
    /// Reference sums (no gradient).
    pub ref_chosen: Tensor<B, 1>,
    /// Reference sums (no gradient).
    pub ref_rejected: Tensor<B, 1>,
    /// Completion tokens of each chosen sequence (≥ 1), as floats.
    pub chosen_tokens: Tensor<B, 1>,
    /// The policy's plain log-prob sum over the chosen completion: `chosen` unless `ld_alpha`
    /// weights it (the SFT term is the plain mean).
    pub chosen_unweighted: Tensor<B, 1>,
    /// Completion tokens of each rejected sequence (≥ 1), as floats.
    pub rejected_tokens: Tensor<B, 1>,
    /// WPO's weight of each pair (no gradient), multiplying every configured loss; `None`: all 1.
    pub weights: Option<Tensor<B, 1>>,
}

impl LossConfig {
    /// The configured losses with their weights (1 when `loss_weights` is absent): the one place
    /// that pairs `loss_type` with `loss_weights`.
    pub fn weighted(&self) -> impl Iterator<Item = (LossType, f64)> + '_ {
        self.loss_types.iter().enumerate().map(|(i, t)| {
            let w = self
                .loss_weights
                .as_ref()
                .and_then(|w| w.get(i))
                .copied()
                .unwrap_or(1.0);
            (*t, w)
        })
    }
}

/// `Σ w·f(loss)` over the configured losses, `f` applied to each loss's per-pair values `[P]`.
fn weighted_sum<B: Backend>(
    config: &LossConfig,
    x: &PairLogps<B>,
    f: impl Fn(Tensor<B, 1>) -> Tensor<B, 1>,
) -> Tensor<B, 1> {
    config
        .weighted()
        .map(|(t, w)| {
            let per_pair = per_pair_loss(t, config, x);
            let per_pair = match &x.weights {
                Some(weights) => per_pair * weights.clone(),
                None => per_pair,
            };
            f(per_pair) * w
        })
        .reduce(|acc, term| acc + term)
        .expect("validated: at least one loss")
}

/// The weighted sum of the configured losses, each the mean over pairs: a one-element tensor.
pub fn dpo_loss<B: Backend>(config: &LossConfig, x: &PairLogps<B>) -> Tensor<B, 1> {
    weighted_sum(config, x, |l| l.mean())
}

/// Each pair's weighted sum of the configured losses, `[P]` (what `prefer eval` reports per pair;
/// its mean is [`dpo_loss`]).
pub fn per_pair_weighted_loss<B: Backend>(config: &LossConfig, x: &PairLogps<B>) -> Tensor<B, 1> {
    weighted_sum(config, x, |l| l)
}
