//! The preference method a run follows (`method`): DPO or KTO against a reference, or one of the
//! reference-free methods of TRL's `CPOTrainer` and `ORPOTrainer`, which score the policy alone and
//! so never build or run a reference.

use std::{fmt, str::FromStr};

use burn::tensor::{Tensor, activation::log_sigmoid, backend::Backend};
use serde::{Deserialize, Serialize};

use super::{LossConfig, LossType, orpo_log_odds, orpo_loss, simpo_loss};

/// Which trainer of TRL's a run follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// `DPOTrainer`: the `loss_type` losses of policy-minus-reference log-ratios.
    #[default]
    Dpo,
    /// `CPOTrainer`: `loss_type` `sigmoid`, `hinge` or `ipo` on the policy's own log-probs (sums;
    /// means for `ipo`), plus `cpo_alpha` × the chosen completions' NLL.
    Cpo,
    /// `CPOTrainer` with `loss_type = "simpo"`: a margin `simpo_gamma` on mean token log-probs; no
    /// NLL term unless `cpo_alpha` is set (CPO-SimPO).
    Simpo,
    /// `ORPOTrainer`: the chosen sequences' NLL (prompt included) minus β × the mean log-sigmoid of
    /// the log odds ratio of mean token log-probs.
    Orpo,
    /// `KTOTrainer` (`loss_type = "kto"`): unpaired examples, each desirable or undesirable,
    /// scored against the reference relative to the batch's estimated KL.
    Kto,
}

impl Method {
    /// All methods with their names.
    pub const ALL: [(Method, &'static str); 5] = [
        (Self::Dpo, "dpo"),
        (Self::Cpo, "cpo"),
        (Self::Simpo, "simpo"),
        (Self::Orpo, "orpo"),
        (Self::Kto, "kto"),
    ];

    /// The method's name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(m, _)| *m == self)
            .map(|(_, n)| *n)
            .unwrap_or("?")
    }

    /// Whether the method compares the policy with a reference (DPO and KTO do).
    pub fn uses_reference(self) -> bool {
        matches!(self, Self::Dpo | Self::Kto)
    }

    /// Whether the method trains on unpaired examples (KTO) rather than preference pairs.
    pub fn unpaired(self) -> bool {
        self == Self::Kto
    }

    /// `cpo_alpha`'s default: TRL's `CPOConfig` 1.0 for CPO, 0 for SimPO (the SimPO paper's and
    /// TRL's recommended setting), unused by the others.
    pub fn default_cpo_alpha(self) -> f64 {
        match self {
            Self::Cpo => 1.0,
            _ => 0.0,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .iter()
            .find(|(_, n)| *n == s)
            .map(|(m, _)| *m)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|(_, n)| *n).collect();
                format!("unknown method `{s}` (valid: {})", names.join(", "))
            })
    }
}

/// The losses `loss_type` may name under CPO (TRL's `CPOConfig.loss_type`, `simpo` aside: that is
/// `method = "simpo"`).
pub const CPO_LOSS_TYPES: [LossType; 3] = [LossType::Sigmoid, LossType::Hinge, LossType::Ipo];

/// The policy's per-pair values a reference-free loss takes, `[P]` each.
#[derive(Debug, Clone)]
pub struct PolicyPairs<B: Backend> {
    /// Log-prob of each chosen completion: the sum, or the per-token mean where the method uses it.
    pub chosen: Tensor<B, 1>,
    /// The same for the rejected completions.
    pub rejected: Tensor<B, 1>,
    /// Negative log-likelihood summed over the tokens the method's NLL term counts, per chosen
    /// sequence (completion tokens; for ORPO the prompt's too).
    pub nll: Tensor<B, 1>,
    /// The number of those tokens.
    pub nll_tokens: Tensor<B, 1>,
}

impl LossConfig {
    /// Whether the method scores a sequence by its per-token mean log-prob rather than the sum.
    pub fn averages_logps(&self) -> bool {
        match self.method {
            Method::Simpo | Method::Orpo => true,
            Method::Cpo => self.loss_types.first() == Some(&LossType::Ipo),
            Method::Dpo | Method::Kto => false,
        }
    }
}

/// The mean NLL over every counted token of the batch (TRL's `nll_loss`: one cross-entropy over
/// the batch's tokens, so longer sequences weigh more).
pub fn batch_nll<B: Backend>(x: &PolicyPairs<B>) -> Tensor<B, 1> {
    x.nll.clone().sum() / x.nll_tokens.clone().sum()
}

/// A reference-free method's loss: one element, differentiable with respect to the policy.
pub fn reference_free_loss<B: Backend>(config: &LossConfig, x: &PolicyPairs<B>) -> Tensor<B, 1> {
    match config.method {
        Method::Orpo => orpo_loss(
            batch_nll(x),
            orpo_log_odds(x.chosen.clone(), x.rejected.clone()),
            config.beta,
        ),
        Method::Simpo | Method::Cpo => {
            let per_pair = cpo_per_pair(config, x.chosen.clone(), x.rejected.clone());
            let alpha = config.cpo_alpha;
            if alpha == 0.0 {
                per_pair.mean()
            } else {
                per_pair.mean() + batch_nll(x) * alpha
            }
        }
        Method::Dpo | Method::Kto => unreachable!("DPO and KTO take the reference"),
    }
}

/// Each pair's loss as if it were a batch of its own (its own NLL): what `prefer eval` reports
/// per pair.
pub fn per_pair_reference_free_loss<B: Backend>(
    config: &LossConfig,
    x: &PolicyPairs<B>,
) -> Tensor<B, 1> {
    let nll = x.nll.clone() / x.nll_tokens.clone();
    match config.method {
        Method::Orpo => {
            nll - log_sigmoid(orpo_log_odds(x.chosen.clone(), x.rejected.clone())) * config.beta
        }
        _ => cpo_per_pair(config, x.chosen.clone(), x.rejected.clone()) + nll * config.cpo_alpha,
    }
}

/// CPO's loss of each pair on the policy's log-probs (TRL's `CPOTrainer.cpo_loss`).
fn cpo_per_pair<B: Backend>(
    config: &LossConfig,
    chosen: Tensor<B, 1>,
    rejected: Tensor<B, 1>,
) -> Tensor<B, 1> {
    let (beta, eps) = (config.beta, config.label_smoothing);
    if config.method == Method::Simpo {
        return simpo_loss(chosen, rejected, beta, config.simpo_gamma, eps);
    }
    let h = chosen - rejected;
    match config.loss_types.first() {
        Some(LossType::Hinge) => (h * -beta + 1.0).clamp_min(0.0),
        Some(LossType::Ipo) => (h - 1.0 / (2.0 * beta)).powi_scalar(2),
        _ => {
            let z = h * beta;
            log_sigmoid(z.clone()) * -(1.0 - eps) - log_sigmoid(z.neg()) * eps
        }
    }
}

/// Checks the options of a reference-free method, naming the key at fault.
pub(super) fn validate_method(config: &LossConfig) -> Result<(), String> {
    let kto_weights = [
        ("desirable_weight", config.desirable_weight),
        ("undesirable_weight", config.undesirable_weight),
    ];
    for (key, w) in kto_weights {
        if !(w >= 0.0 && w.is_finite()) {
            return Err(format!("{key} must be a non-negative number (got {w})"));
        }
        if w != 1.0 && config.method != Method::Kto {
            return Err(format!(
                "{key} is a KTO option: set method = \"kto\" or leave it unset"
            ));
        }
    }
    let kto_loss = config
        .loss_types
        .iter()
        .find(|t| matches!(t, LossType::Kto | LossType::ApoZeroUnpaired));
    if let Some(t) = kto_loss.filter(|_| config.method != Method::Kto) {
        return Err(format!(
            "loss_type `{t}` is KTOTrainer's: set method = \"kto\""
        ));
    }
    if config.method == Method::Dpo {
        return Ok(());
    }
    let name = config.method.name();
    let single = config.loss_types.len() == 1 && config.loss_weights.is_none();
    let allowed: &[LossType] = match config.method {
        Method::Cpo => &CPO_LOSS_TYPES,
        // `sigmoid` is prefer's default for every method: under kto it means `kto`.
        Method::Kto => &[LossType::Sigmoid, LossType::Kto, LossType::ApoZeroUnpaired],
        _ => &[LossType::Sigmoid],
    };
    if !single || !allowed.contains(&config.loss_types[0]) {
        return Err(match config.method {
            Method::Cpo => "loss_type under method cpo must be one of sigmoid, hinge, ipo (one \
                            loss, no loss_weights); SimPO is method = \"simpo\""
                .into(),
            Method::Kto => "loss_type under method kto must be kto or apo_zero_unpaired (one \
                            loss, no loss_weights)"
                .into(),
            _ => format!(
                "loss_type does not apply to method {name}: leave it unset (or \"sigmoid\")"
            ),
        });
    }
    if matches!(config.method, Method::Orpo | Method::Kto) && config.label_smoothing != 0.0 {
        return Err(format!("label_smoothing does not apply to method {name}"));
    }
    if config.ld_alpha.is_some() {
        return Err(format!(
            "ld_alpha is a DPO option, not one of method {name}"
        ));
    }
    if config.use_weighting {
        return Err(format!(
            "use_weighting is a DPO option, not one of method {name}"
        ));
    }
    if config.f_divergence.kind != super::FDivergenceType::ReverseKl {
        return Err(format!(
            "f_divergence_type is a DPO option, not one of method {name}"
        ));
    }
    if config.method == Method::Kto && config.cpo_alpha != 0.0 {
        return Err("cpo_alpha is a CPO option, not one of method kto".into());
    }
    if !(config.cpo_alpha >= 0.0 && config.cpo_alpha.is_finite()) {
        return Err("cpo_alpha must be a non-negative number".into());
    }
    if !config.simpo_gamma.is_finite() {
        return Err("simpo_gamma must be a finite number".into());
    }
    Ok(())
}

/// ORPO's two extra metrics from per-pair mean log-probs: `log_odds_ratio` (the mean log-sigmoid
/// of the log odds ratio) and `log_odds_chosen` (the mean log odds ratio).
pub fn orpo_log_odds_metrics(chosen_avg: &[f64], rejected_avg: &[f64]) -> (f64, f64) {
    let n = chosen_avg.len().max(1) as f64;
    let log1m_exp = |x: f64| (-x.exp()).ln_1p();
    let (mut ratio, mut odds) = (0.0, 0.0);
    for (c, r) in chosen_avg.iter().zip(rejected_avg) {
        let log_odds = (c - r) - (log1m_exp(*c) - log1m_exp(*r));
        odds += log_odds;
        // log σ(x) = −softplus(−x), computed stably.
        ratio += -((-log_odds).max(0.0) + (-log_odds.abs()).exp().ln_1p());
    }
    (ratio / n, odds / n)
}
