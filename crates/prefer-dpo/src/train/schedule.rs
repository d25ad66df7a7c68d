//! Learning-rate schedules as Hugging Face's `get_scheduler` shapes them, stepped once per optimiser
//! step (burn-train's own schedulers step once per micro-batch, which is not what TRL users expect).

use burn::{optim::lr_scheduler::LrScheduler, tensor::backend::Backend};

use std::f64::consts::PI;

use super::config::{LrSchedulerKwargs, LrSchedulerType, WsdShape};

/// A schedule over `total` optimiser steps with `warmup` warm-up steps.
///
/// `step()` returns the rate for the next optimiser step: the first call gives the rate of step 0
/// (0 during a linear warm-up, as Hugging Face's `LambdaLR`).
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    /// Shape.
    pub kind: LrSchedulerType,
    /// The shape's own arguments.
    pub kwargs: LrSchedulerKwargs,
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
    /// The rate of optimiser step `s` (0-based): the peak times the shape's factor, which follows
    /// transformers' `optimization.py` case by case.
    pub fn lr_at(&self, s: usize) -> f64 {
        let (s, w, t) = (s as f64, self.warmup as f64, self.total as f64);
        let k = &self.kwargs;
        let progress = (s - w) / (t - w).max(1.0);
        let cosine = |cycles: f64, p: f64| 0.5 * (1.0 + (PI * cycles * 2.0 * p).cos());
        let factor = match self.kind {
            // Its rate follows the evaluations ([`super::plateau::Plateau`]); it starts at the peak.
            LrSchedulerType::Constant | LrSchedulerType::ReduceLrOnPlateau => 1.0,
            LrSchedulerType::WarmupStableDecay => self.wsd(s),
            _ if s < w => s / w.max(1.0),
            LrSchedulerType::ConstantWithWarmup => 1.0,
            LrSchedulerType::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            LrSchedulerType::Cosine => cosine(k.num_cycles.unwrap_or(0.5), progress).max(0.0),
            LrSchedulerType::CosineWithRestarts if progress >= 1.0 => 0.0,
            LrSchedulerType::CosineWithRestarts => {
                let cycles = k.num_cycles.unwrap_or(1.0);
                (0.5 * (1.0 + (PI * ((cycles * progress) % 1.0)).cos())).max(0.0)
            }
            LrSchedulerType::Polynomial => {
                let (end, power) = (k.lr_end.unwrap_or(1e-7), k.power.unwrap_or(1.0));
                let lr = if s > t {
                    end
                } else {
                    let remaining = 1.0 - (s - w) / (t - w);
                    (self.peak - end) * remaining.powf(power) + end
                };
                lr / self.peak
            }
            LrSchedulerType::InverseSqrt => {
                let scale = k.timescale.unwrap_or(if w > 0.0 { w } else { 10_000.0 });
                1.0 / ((s + scale - w) / scale).sqrt()
            }
            LrSchedulerType::CosineWithMinLr => {
                let floor = k
                    .min_lr_rate
                    .or(k.min_lr.map(|m| m / self.peak))
                    .unwrap_or(0.0);
                let f = cosine(k.num_cycles.unwrap_or(0.5), progress);
                (f * (1.0 - floor) + floor).max(0.0)
            }
        };
        self.peak * factor
    }

    /// `warmup_stable_decay`: a shaped warm-up from the floor, the peak, a shaped decay to the
    /// floor, then the floor.
    fn wsd(&self, s: f64) -> f64 {
        let k = &self.kwargs;
        let floor = k.min_lr_ratio.unwrap_or(0.0);
        let (w, t) = (self.warmup as f64, self.total as f64);
        let decay = k.num_decay_steps.unwrap_or(0) as f64;
        let stable = k.num_stable_steps.map_or(t - w - decay, |n| n as f64);
        let shaped = |f: f64| (f * (1.0 - floor) + floor).max(0.0);
        if s < w {
            let p = s / w.max(1.0);
            return shaped(match k.warmup_type.unwrap_or(WsdShape::Linear) {
                WsdShape::Linear => p,
                WsdShape::Cosine => 0.5 * (1.0 - (PI * p).cos()),
                WsdShape::OneMinusSqrt => 1.0 - (1.0 - p).sqrt(),
            });
        }
        if s < w + stable {
            return 1.0;
        }
        if s < w + stable + decay {
            let p = (s - w - stable) / decay.max(1.0);
            let cycles = k.num_cycles.unwrap_or(0.5);
            return shaped(match k.decay_type.unwrap_or(WsdShape::Cosine) {
                WsdShape::Linear => 1.0 - p,
                WsdShape::Cosine => 0.5 * (1.0 + (PI * cycles * 2.0 * p).cos()),
                WsdShape::OneMinusSqrt => 1.0 - p.sqrt(),
            });
        }
        floor
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
