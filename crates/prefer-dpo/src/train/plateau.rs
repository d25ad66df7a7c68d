//! `reduce_lr_on_plateau`: torch's `ReduceLROnPlateau` as transformers' Trainer drives it. The rate
//! starts at the peak (no warm-up) and is multiplied by `factor` after an evaluation that ends a
//! run of more than `patience` evaluations in which `metric_for_best_model` did not improve;
//! `eval_on_start` does not count.

use serde::{Deserialize, Serialize};

use super::config::LrSchedulerKwargs;

/// Which way the metric improves (`mode`; torch's default `min`, which transformers keeps whatever
/// `greater_is_better` says).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlateauMode {
    /// Lower is better.
    #[default]
    Min,
    /// Higher is better.
    Max,
}

/// How `threshold` measures an improvement (`threshold_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThresholdMode {
    /// By a fraction of the best value.
    #[default]
    Rel,
    /// By an absolute amount.
    Abs,
}

/// The schedule's arguments, torch's defaults for what `lr_scheduler_kwargs` leaves out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlateauOptions {
    /// Which way the metric improves.
    pub mode: PlateauMode,
    /// The rate's multiplier at a plateau (0.1).
    pub factor: f64,
    /// Evaluations without improvement tolerated (10).
    pub patience: usize,
    /// The least change that counts as an improvement (1e-4).
    pub threshold: f64,
    /// How `threshold` applies.
    pub threshold_mode: ThresholdMode,
    /// Evaluations after a cut during which none is counted (0).
    pub cooldown: usize,
    /// The rate never goes below this (0).
    pub min_lr: f64,
    /// A cut smaller than this is not made (1e-8).
    pub eps: f64,
}

impl From<&LrSchedulerKwargs> for PlateauOptions {
    fn from(k: &LrSchedulerKwargs) -> Self {
        Self {
            mode: k.mode.unwrap_or_default(),
            factor: k.factor.unwrap_or(0.1),
            patience: k.patience.unwrap_or(10),
            threshold: k.threshold.unwrap_or(1e-4),
            threshold_mode: k.threshold_mode.unwrap_or_default(),
            cooldown: k.cooldown.unwrap_or(0),
            min_lr: k.min_lr.unwrap_or(0.0),
            eps: k.eps.unwrap_or(1e-8),
        }
    }
}

/// Where the schedule stands; checkpoints carry it so a resumed run goes on at the same rate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Plateau {
    /// The current rate.
    pub lr: f64,
    /// The best metric so far (none before the first evaluation).
    pub best: Option<f64>,
    /// Evaluations since the metric last improved.
    pub bad_evals: usize,
    /// Evaluations of cooldown left.
    pub cooldown_left: usize,
}

impl Plateau {
    /// The schedule before any evaluation, at the `peak` rate.
    pub fn new(peak: f64) -> Self {
        Self {
            lr: peak,
            best: None,
            bad_evals: 0,
            cooldown_left: 0,
        }
    }

    /// Takes one evaluation's metric, cutting the rate at a plateau (torch's `step(metrics)`).
    pub fn observe(&mut self, metric: f64, o: &PlateauOptions) {
        if self.improves(metric, o) {
            self.best = Some(metric);
            self.bad_evals = 0;
        } else {
            self.bad_evals += 1;
        }
        if self.cooldown_left > 0 {
            self.cooldown_left -= 1;
            self.bad_evals = 0;
        }
        if self.bad_evals > o.patience {
            let cut = (self.lr * o.factor).max(o.min_lr);
            if self.lr - cut > o.eps {
                self.lr = cut;
            }
            self.cooldown_left = o.cooldown;
            self.bad_evals = 0;
        }
    }

    fn improves(&self, metric: f64, o: &PlateauOptions) -> bool {
        // torch starts from the worst value there is.
        let best = self.best.unwrap_or(match o.mode {
            PlateauMode::Min => f64::INFINITY,
            PlateauMode::Max => f64::NEG_INFINITY,
        });
        match (o.mode, o.threshold_mode) {
            (PlateauMode::Min, ThresholdMode::Rel) => metric < best * (1.0 - o.threshold),
            (PlateauMode::Min, ThresholdMode::Abs) => metric < best - o.threshold,
            (PlateauMode::Max, ThresholdMode::Rel) => metric > best * (1.0 + o.threshold),
            (PlateauMode::Max, ThresholdMode::Abs) => metric > best + o.threshold,
        }
    }
}
