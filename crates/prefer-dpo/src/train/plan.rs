//! The step plan: how many micro-batches make an epoch and an optimiser step, how many optimiser
//! steps the run takes and how many of them warm up — all counted in optimiser steps, as TRL does.

use super::config::TrainConfig;

/// How a run's pairs become optimiser steps. A micro-batch is global: each of the `replicas`
/// runs `batch_size` of its pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepPlan {
    /// Pairs per micro-batch and replica (`per_device_train_batch_size`).
    pub batch_size: usize,
    /// Replicas sharing each micro-batch (data parallelism; 1 on one device).
    pub replicas: usize,
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
    /// The plan for `n_pairs` training pairs over `replicas` replicas: `max_steps` when set, else
    /// `num_train_epochs` (a fraction rounds up to a whole step); `warmup_steps` when set, else
    /// `warmup_ratio`.
    pub fn new(config: &TrainConfig, n_pairs: usize, replicas: usize) -> Self {
        let batch_size = config.per_device_train_batch_size.max(1);
        let replicas = replicas.max(1);
        let accumulation = config.gradient_accumulation_steps.max(1);
        let batches_per_epoch = n_pairs.div_ceil(batch_size * replicas);
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
            replicas,
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

    /// Pairs per (global) micro-batch.
    pub fn global_batch(&self) -> usize {
        self.batch_size * self.replicas
    }

    /// The pair positions (into the epoch's order of `n_pairs`) that replica `rank` runs of
    /// micro-batch `b`. One replica's last micro-batch of an epoch may be short; with several,
    /// the positions past the end wrap to the epoch's start, so every replica runs a full batch
    /// (accelerate's `even_batches`) and the gradient mean weighs every replica alike.
    pub fn shard(&self, b: usize, rank: usize, n_pairs: usize) -> impl Iterator<Item = usize> {
        let start = b * self.global_batch() + rank * self.batch_size;
        let end = match self.replicas {
            1 => (start + self.batch_size).min(n_pairs),
            _ => start + self.batch_size,
        };
        (start..end).map(move |p| p % n_pairs.max(1))
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
        let plan = StepPlan::new(&config, 30, 1);
        assert_eq!(plan.batches_per_epoch, 8);
        assert_eq!(plan.total_steps, 5);
        assert_eq!(plan.warmup_steps, 1);
        assert_eq!((plan.group(0), plan.group(6)), (3, 2));
        assert_eq!(plan.shard(7, 0, 30).collect::<Vec<_>>(), [28, 29]);
        // max_steps and warmup_steps win.
        let plan = StepPlan::new(
            &TrainConfig {
                max_steps: 7,
                warmup_steps: 2,
                ..config
            },
            30,
            1,
        );
        assert_eq!((plan.total_steps, plan.warmup_steps), (7, 2));
    }

    /// Two replicas of 2 pairs run the 4 pairs a replica of 4 would, and the last micro-batch's
    /// missing pairs come from the epoch's start.
    #[test]
    fn replicas_split_each_micro_batch_and_fill_the_last() {
        let config = TrainConfig {
            per_device_train_batch_size: 2,
            ..Default::default()
        };
        let plan = StepPlan::new(&config, 10, 2);
        assert_eq!(plan.batches_per_epoch, 3);
        let shard = |b, r| plan.shard(b, r, 10).collect::<Vec<_>>();
        assert_eq!((shard(1, 0), shard(1, 1)), (vec![4, 5], vec![6, 7]));
        assert_eq!((shard(2, 0), shard(2, 1)), (vec![8, 9], vec![0, 1]));
    }
}
