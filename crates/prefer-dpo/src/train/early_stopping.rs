//! Early stopping as transformers' `EarlyStoppingCallback` does it: after each evaluation, the
//! watched metric either improves on the best so far by more than the threshold, or counts one more
//! evaluation without improvement; at `patience` of those, training stops. The best value and the
//! count live in the trainer's state, so a resumed run continues the count.

use super::{TrainError, config::TrainConfig, metrics_log::LogRecord};

/// The rule: which metric, which direction, how much counts as better, how long to wait.
#[derive(Debug, Clone, PartialEq)]
pub struct EarlyStopping {
    /// The eval metric watched (`metric_for_best_model`, e.g. `eval_loss`).
    pub metric: String,
    /// Whether larger is better.
    pub greater_is_better: bool,
    /// Improvements of this much or less do not count.
    pub threshold: f64,
    /// Evaluations without improvement that stop training.
    pub patience: usize,
}

/// The best value so far and the evaluations since it (kept in `trainer_state.json`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Progress {
    /// The best value of the metric so far.
    pub best: Option<f64>,
    /// Evaluations since the best one.
    pub without_improvement: usize,
}

impl EarlyStopping {
    /// The rule `config` asks for, or `None` without `early_stopping_patience`.
    pub fn from_config(config: &TrainConfig) -> Option<Self> {
        config.early_stopping_patience.map(|patience| Self {
            metric: config.best_metric(),
            greater_is_better: config.greater_is_better(),
            threshold: config.early_stopping_threshold,
            patience,
        })
    }

    /// Counts the evaluation `record` into `progress`; true when training should stop.
    pub fn update(&self, progress: &mut Progress, record: &LogRecord) -> Result<bool, TrainError> {
        let value = record.get(&self.metric).ok_or_else(|| {
            TrainError::Data(format!(
                "metric_for_best_model `{}` is not logged",
                self.metric
            ))
        })?;
        let sign = if self.greater_is_better { 1.0 } else { -1.0 };
        let improved = progress
            .best
            .is_none_or(|best| sign * (value - best) > self.threshold);
        if improved {
            progress.best = Some(value);
            progress.without_improvement = 0;
        } else {
            progress.without_improvement += 1;
        }
        Ok(progress.without_improvement >= self.patience)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(loss: f64) -> LogRecord {
        LogRecord {
            step: 0,
            epoch: 0.0,
            values: [("eval_loss".to_string(), loss)].into(),
        }
    }

    fn rule(patience: usize, threshold: f64) -> EarlyStopping {
        EarlyStopping {
            metric: "eval_loss".into(),
            greater_is_better: false,
            threshold,
            patience,
        }
    }

    /// The evaluation at which the rule stops, for a sequence of losses.
    fn stops_at(rule: &EarlyStopping, losses: &[f64]) -> Option<usize> {
        let mut progress = Progress::default();
        losses
            .iter()
            .position(|&l| rule.update(&mut progress, &eval(l)).unwrap())
    }

    #[test]
    fn stops_after_patience_evaluations_without_improvement() {
        assert_eq!(
            stops_at(&rule(2, 0.0), &[1.0, 0.9, 0.95, 0.91, 0.8]),
            Some(3)
        );
        // An improvement resets the count.
        assert_eq!(stops_at(&rule(2, 0.0), &[1.0, 1.1, 0.9, 1.0, 0.5]), None);
        // Improvements within the threshold do not count.
        assert_eq!(stops_at(&rule(2, 0.05), &[1.0, 0.97, 0.96]), Some(2));
    }

    #[test]
    fn larger_is_better_for_accuracies_and_a_missing_metric_is_named() {
        let acc = EarlyStopping {
            metric: "eval_rewards/accuracies".into(),
            greater_is_better: true,
            threshold: 0.0,
            patience: 1,
        };
        let mut progress = Progress::default();
        let record = |v: f64| LogRecord {
            step: 0,
            epoch: 0.0,
            values: [("eval_rewards/accuracies".to_string(), v)].into(),
        };
        assert!(!acc.update(&mut progress, &record(0.5)).unwrap());
        assert!(!acc.update(&mut progress, &record(0.7)).unwrap());
        assert!(acc.update(&mut progress, &record(0.6)).unwrap());
        let err = acc.update(&mut progress, &eval(1.0)).unwrap_err();
        assert!(
            err.to_string()
                .contains("`eval_rewards/accuracies` is not logged")
        );
    }

    #[test]
    fn the_rule_comes_from_the_config() {
        assert_eq!(EarlyStopping::from_config(&TrainConfig::default()), None);
        let config = TrainConfig {
            early_stopping_patience: Some(3),
            metric_for_best_model: "eval_rewards/margins".into(),
            ..Default::default()
        };
        let rule = EarlyStopping::from_config(&config).unwrap();
        assert!(rule.greater_is_better && rule.patience == 3);
    }
}
