//! The preference metrics as burn-train [`Metric`]s, so a run driven by burn-train's `Learner` or
//! `SupervisedTraining` shows `rewards/accuracies`, `rewards/margins`, … on burn-train's dashboard
//! and in its file logger, with the values prefer writes to `metrics.jsonl`.

use std::sync::Arc;

use burn::train::metric::{
    Adaptor, Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes,
    NumericEntry, SerializedEntry,
};

use super::step::DpoOutput;
use crate::{
    loss::{LossConfig, Method},
    metrics::PairRecords,
};

/// One preference metric (`rewards/accuracies`, `kl`, `nll_loss`, …) over the pairs of the
/// current batch and, as its running value, over every pair since the last `clear`: the same
/// pair- and token-weighted means as prefer's log window, not burn-train's mean of batch means.
///
/// burn-train's file logger writes each metric to a file named after it, so the metric's name is
/// TRL's with `/` as `_` (`rewards_accuracies`).
#[derive(Debug, Clone)]
pub struct PreferenceMetric {
    name: MetricName,
    key: String,
    method: Method,
    beta: f64,
    current: f64,
    current_pairs: usize,
    seen: PairRecords,
    running: f64,
}

impl PreferenceMetric {
    /// The metric TRL names `name` (as in `metrics.jsonl`) of the method and β in `loss`, or
    /// an error listing the names that method logs.
    pub fn new(name: &str, loss: &LossConfig) -> Result<Self, String> {
        let names = Self::names(loss);
        if !names.iter().any(|n| n == name) {
            return Err(format!(
                "`{name}` is not a preference metric of method {} (valid: {})",
                loss.method,
                names.join(", ")
            ));
        }
        Ok(Self {
            name: Arc::new(name.replace('/', "_")),
            key: name.to_string(),
            method: loss.method,
            beta: loss.beta,
            current: f64::NAN,
            current_pairs: 0,
            seen: PairRecords::default(),
            running: f64::NAN,
        })
    }

    /// TRL's name of the metric, as in `metrics.jsonl`.
    pub fn trl_name(&self) -> &str {
        &self.key
    }

    /// Every preference metric the method in `loss` logs, one [`PreferenceMetric`] each.
    pub fn all(loss: &LossConfig) -> Vec<Self> {
        Self::names(loss)
            .iter()
            .filter_map(|n| Self::new(n, loss).ok())
            .collect()
    }

    /// The names the method logs from per-pair values (the loss is burn-train's own metric).
    fn names(loss: &LossConfig) -> Vec<String> {
        // Two records, so that KTO's per-label metrics (one desirable, one undesirable) all show.
        let mut one = PairRecords {
            chosen: vec![-1.0, -1.0],
            rejected: vec![-2.0, -2.0],
            ref_chosen: vec![0.0, 0.0],
            ref_rejected: vec![0.0, 0.0],
            chosen_tokens: vec![1.0, 1.0],
            rejected_tokens: vec![1.0, 1.0],
            chosen_logit_sums: vec![0.0, 0.0],
            rejected_logit_sums: vec![0.0, 0.0],
            labels: vec![true, false],
            ..Default::default()
        };
        if !loss.method.uses_reference() {
            one.nll = vec![1.0, 1.0];
            one.nll_tokens = vec![1.0, 1.0];
        }
        one.metrics_of(loss.method, loss.beta).into_keys().collect()
    }

    fn value_of(&self, records: &PairRecords) -> f64 {
        records
            .metrics_of(self.method, self.beta)
            .get(&self.key)
            .copied()
            .unwrap_or(f64::NAN)
    }
}

impl Metric for PreferenceMetric {
    type Input = PairRecords;

    fn update(&mut self, records: &PairRecords, _metadata: &MetricMetadata) -> SerializedEntry {
        self.current = self.value_of(records);
        self.current_pairs = records.len();
        self.seen.extend(records);
        self.running = self.value_of(&self.seen);
        let serialized = NumericEntry::Aggregated {
            aggregated_value: self.current,
            count: self.current_pairs,
        }
        .serialize();
        SerializedEntry::new(
            format!("epoch {:.4} - batch {:.4}", self.running, self.current),
            serialized,
        )
    }

    fn clear(&mut self) {
        self.seen = PairRecords::default();
        self.current = f64::NAN;
        self.current_pairs = 0;
        self.running = f64::NAN;
    }

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        let lower_is_better = ["kl", "nll_loss", "rewards/rejected", "logps/rejected"];
        NumericAttributes {
            unit: None,
            higher_is_better: !lower_is_better.contains(&self.key.as_str()),
        }
        .into()
    }
}

impl Numeric for PreferenceMetric {
    fn value(&self) -> NumericEntry {
        NumericEntry::Aggregated {
            aggregated_value: self.current,
            count: self.current_pairs,
        }
    }

    fn running_value(&self) -> NumericEntry {
        NumericEntry::Aggregated {
            aggregated_value: self.running,
            count: self.seen.len(),
        }
    }
}

impl Adaptor<PairRecords> for DpoOutput {
    fn adapt(&self) -> PairRecords {
        self.records.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(chosen: &[f64], rejected: &[f64]) -> PairRecords {
        let n = chosen.len();
        PairRecords {
            chosen: chosen.to_vec(),
            rejected: rejected.to_vec(),
            ref_chosen: vec![0.0; n],
            ref_rejected: vec![0.0; n],
            chosen_tokens: vec![2.0; n],
            rejected_tokens: vec![3.0; n],
            chosen_logit_sums: vec![0.5; n],
            rejected_logit_sums: vec![0.25; n],
            ..Default::default()
        }
    }

    /// The batch value is the batch's metric; the running value is the metric over every pair
    /// since `clear`, as prefer's log window computes it.
    #[test]
    fn batch_and_running_values_are_prefers_metrics() {
        let loss = LossConfig::default();
        let mut m = PreferenceMetric::new("rewards/accuracies", &loss).unwrap();
        assert_eq!(m.name().as_str(), "rewards_accuracies");
        let progress = || burn::data::dataloader::Progress {
            items_processed: 1,
            items_total: 1,
        };
        let meta = MetricMetadata {
            progress: progress(),
            global_progress: progress(),
            iteration: Some(0),
            lr: None,
        };
        let (a, b) = (records(&[1.0, -1.0], &[0.0, 0.0]), records(&[2.0], &[0.0]));
        m.update(&a, &meta);
        assert_eq!(m.value().current(), 0.5);
        m.update(&b, &meta);
        assert_eq!(m.value().current(), 1.0);
        let mut both = a.clone();
        both.extend(&b);
        let want = both.metrics(0.1)["rewards/accuracies"];
        assert_eq!(m.running_value().current(), want);
        m.clear();
        assert!(m.running_value().current().is_nan());
    }

    #[test]
    fn each_method_has_its_metrics_and_unknown_names_are_refused() {
        let dpo: Vec<String> = PreferenceMetric::all(&LossConfig::default())
            .iter()
            .map(|m| m.trl_name().to_string())
            .collect();
        for n in ["rewards/accuracies", "rewards/margins", "kl", "num_pairs"] {
            assert!(dpo.iter().any(|d| d == n), "{n} in {dpo:?}");
        }
        let orpo = LossConfig {
            method: Method::Orpo,
            ..Default::default()
        };
        let names: Vec<String> = PreferenceMetric::all(&orpo)
            .iter()
            .map(|m| m.trl_name().to_string())
            .collect();
        assert!(names.iter().any(|n| n == "log_odds_ratio"), "{names:?}");
        assert!(!names.iter().any(|n| n == "kl"), "{names:?}");
        let kto = LossConfig {
            method: Method::Kto,
            ..Default::default()
        };
        let names: Vec<String> = PreferenceMetric::all(&kto)
            .iter()
            .map(|m| m.trl_name().to_string())
            .collect();
        for n in [
            "kl",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
        ] {
            assert!(names.iter().any(|k| k == n), "{n} in {names:?}");
        }
        assert!(
            !names.iter().any(|n| n == "rewards/accuracies"),
            "{names:?}"
        );
        let err = PreferenceMetric::new("accuracy", &LossConfig::default()).unwrap_err();
        assert!(
            err.contains("valid: ") && err.contains("rewards/accuracies"),
            "{err}"
        );
    }
}
