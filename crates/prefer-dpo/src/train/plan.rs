//! The step plan: how many micro-batches make an epoch and an optimiser step, how many optimiser
//! steps the run takes and how many of them warm up — all counted in optimiser steps, as TRL does.

use super::config::TrainConfig;

/// How a run's pairs become optimiser steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepPlan {
    /// Pairs per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimiser step (the last one of an epoch may have fewer).
    pub accumulation: usize,
    /// Micro-batches per epoch (the last one may hold fewer pairs).
    pub batches_per_epoch: usize,
    /// Optimiser steps of the whole run.
    pub total_steps: usize,
    /// Warm-up optimiser steps.
    pub warmup_steps: usize,
}

impl StepPlan {
    /// The plan for `n_pairs` training pairs: `max_steps` when set, else `num_train_epochs` (a
    /// fraction rounds up to a whole step); `warmup_steps` when set, else `warmup_ratio`.
    pub fn new(config: &TrainConfig, n_pairs: usize) -> Self {
        let batch_size = config.per_device_train_batch_size.max(1);
        let accumulation = config.gradient_accumulation_steps.max(1);
        let batches_per_epoch = n_pairs.div_ceil(batch_size);
        let steps_per_epoch = batches_per_epoch.div_ceil(accumulation);
        let total_steps = if config.max_steps > 0 {
            config.max_steps as usize
        } else {
            ((config.num_train_epochs * steps_per_epoch as f64).ceil() as usize).max(1)
        };
        let warmup_steps = if config.warmup_steps > 0 {
            config.warmup_steps
        } else {
            (config.warmup_ratio * total_steps as f64).ceil() as usize
        };
        Self {
            batch_size,
            accumulation,
            batches_per_epoch,
            total_steps,
            warmup_steps,
        }
    }

    /// The micro-batches of the optimiser step that starts at micro-batch `batch_in_epoch`.
    pub fn group(&self, batch_in_epoch: usize) -> usize {
        self.accumulation
            .min(self.batches_per_epoch.saturating_sub(batch_in_epoch))
    }

    /// The pair positions (into the epoch's order) of micro-batch `b` of `n_pairs`.
    pub fn batch(&self, b: usize, n_pairs: usize) -> std::ops::Range<usize> {
        b * self.batch_size..((b + 1) * self.batch_size).min(n_pairs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_accumulation_and_warmup_become_optimiser_steps() {
        let config = TrainConfig {
            per_device_train_batch_size: 4,
            gradient_accumulation_steps: 3,
            num_train_epochs: 1.5,
            warmup_ratio: 0.1,
            ..Default::default()
        };
        // 30 pairs: 8 micro-batches (the last of 2 pairs), 3 steps per epoch (the last of 2).
        let plan = StepPlan::new(&config, 30);
        assert_eq!(plan.batches_per_epoch, 8);
        assert_eq!(plan.total_steps, 5);
        assert_eq!(plan.warmup_steps, 1);
        assert_eq!((plan.group(0), plan.group(6)), (3, 2));
        assert_eq!(plan.batch(7, 30), 28..30);
        // max_steps and warmup_steps win.
        let plan = StepPlan::new(
            &TrainConfig {
                max_steps: 7,
                warmup_steps: 2,
                ..config
            },
            30,
        );
        assert_eq!((plan.total_steps, plan.warmup_steps), (7, 2));
    }
}
