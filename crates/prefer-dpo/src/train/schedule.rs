//! Learning-rate schedules as Hugging Face's `get_scheduler` shapes them, stepped once per optimiser
//! step (burn-train's own schedulers step once per micro-batch, which is not what TRL users expect).

use burn::{optim::lr_scheduler::LrScheduler, tensor::backend::Backend};

use super::config::LrSchedulerType;

/// A schedule over `total` optimiser steps with `warmup` warm-up steps.
///
/// `step()` returns the rate for the next optimiser step: the first call gives the rate of step 0
/// (0 during a linear warm-up, as Hugging Face's `LambdaLR`).
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    /// Shape.
    pub kind: LrSchedulerType,
    /// Peak rate.
    pub peak: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// All optimiser steps.
    pub total: usize,
    /// Optimiser steps taken so far.
    pub step: usize,
}

impl LrSchedule {
    /// The rate of optimiser step `s` (0-based).
    pub fn lr_at(&self, s: usize) -> f64 {
        let (s, w, t) = (s as f64, self.warmup as f64, self.total as f64);
        let warm = |s: f64| s / w.max(1.0);
        let factor = match self.kind {
            LrSchedulerType::Constant => 1.0,
            _ if s < w => warm(s),
            LrSchedulerType::ConstantWithWarmup => 1.0,
            LrSchedulerType::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            LrSchedulerType::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        };
        self.peak * factor
    }
}

impl LrScheduler for LrSchedule {
    type Record<B: Backend> = usize;

    fn step(&mut self) -> f64 {
        let lr = self.lr_at(self.step);
        self.step += 1;
        lr
    }

    fn to_record<B: Backend>(&self) -> usize {
        self.step
    }

    fn load_record<B: Backend>(mut self, record: usize) -> Self {
        self.step = record;
        self
    }
}
