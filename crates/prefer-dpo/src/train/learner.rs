//! The trainer's unit of work is burn-train's [`Learner`]: it holds the policy, AdamW and the
//! learning-rate schedule, and takes each optimiser step's `lr_step` and `optimizer_step`; prefer's
//! loop keeps TRL's semantics on top (micro-batch gradients averaged, one global-norm clip, one rate
//! step per optimiser step).
//!
//! Burn 0.21's `Learner` keeps its optimiser and scheduler private: only burn-train's own
//! `LearningCheckpointer` reads them, and it needs burn-train's event store, which only burn-train
//! can build. So both go into the Learner behind [`Shared`] handles, and the loop keeps a second
//! handle to each: checkpoints read the optimiser's record through it, and `reduce_lr_on_plateau`
//! sets the rate the schedule gives.

use std::sync::{Arc, Mutex, MutexGuard};

use burn::{
    module::AutodiffModule,
    optim::{
        GradientsParams, LearningRate, MultiGradientsParams, Optimizer, lr_scheduler::LrScheduler,
    },
    tensor::backend::{AutodiffBackend, Backend},
    train::{Learner, LearningComponentsMarker},
};

use super::{checkpoint::DpoOptimizer, schedule::LrSchedule, step::DpoPolicy};

/// The Learner a DPO run drives.
pub type DpoLearner<B, L> = Learner<
    LearningComponentsMarker<B, Shared<TrlSchedule>, DpoPolicy<B, L>, Shared<DpoOptimizer<B, L>>>,
>;

/// A value the Learner owns and the loop still reaches: clones share it.
#[derive(Debug)]
pub struct Shared<T>(Arc<Mutex<T>>);

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<T> Shared<T> {
    /// Shares `value`.
    pub fn new(value: T) -> Self {
        Self(Arc::new(Mutex::new(value)))
    }

    /// The value, locked. A panic while it was locked (a failed device read inside a step)
    /// leaves it as the step left it, which the loop never goes on from.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the value with `f` of it (for the by-value `load_record`s).
    fn replace_with(&self, f: impl FnOnce(T) -> T)
    where
        T: Clone,
    {
        let mut guard = self.lock();
        *guard = f(guard.clone());
    }
}

impl<M, B, O> Optimizer<M, B> for Shared<O>
where
    M: AutodiffModule<B>,
    B: AutodiffBackend,
    O: Optimizer<M, B>,
{
    type Record = O::Record;

    fn step(&mut self, lr: LearningRate, module: M, grads: GradientsParams) -> M {
        self.lock().step(lr, module, grads)
    }

    fn step_multi(&mut self, lr: LearningRate, module: M, grads: MultiGradientsParams) -> M {
        self.lock().step_multi(lr, module, grads)
    }

    fn to_record(&self) -> Self::Record {
        self.lock().to_record()
    }

    fn load_record(self, record: Self::Record) -> Self {
        self.replace_with(|o| o.load_record(record));
        self
    }
}

/// The rate of one optimiser step: Hugging Face's schedule, or — with `reduce_lr_on_plateau` —
/// the rate the loop last set from its evaluations.
#[derive(Debug, Clone)]
pub struct TrlSchedule {
    /// The step-driven schedule (it also counts the steps under `reduce_lr_on_plateau`).
    pub schedule: LrSchedule,
    /// `reduce_lr_on_plateau`'s current rate.
    pub plateau_lr: Option<f64>,
}

impl LrScheduler for TrlSchedule {
    type Record<B: Backend> = usize;

    fn step(&mut self) -> LearningRate {
        let scheduled = self.schedule.step();
        self.plateau_lr.unwrap_or(scheduled)
    }

    fn to_record<B: Backend>(&self) -> usize {
        LrScheduler::to_record::<B>(&self.schedule)
    }

    fn load_record<B: Backend>(mut self, record: usize) -> Self {
        self.schedule = LrScheduler::load_record::<B>(self.schedule, record);
        self
    }
}

impl<S: LrScheduler> LrScheduler for Shared<S> {
    type Record<B: Backend> = S::Record<B>;

    fn step(&mut self) -> LearningRate {
        self.lock().step()
    }

    fn to_record<B: Backend>(&self) -> Self::Record<B> {
        self.lock().to_record::<B>()
    }

    fn load_record<B: Backend>(self, record: Self::Record<B>) -> Self {
        self.replace_with(|s| s.load_record::<B>(record));
        self
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;

    use super::*;
    use crate::train::config::LrSchedulerType;

    /// The Learner's handle and the loop's are one schedule: the loop's plateau rate is what the
    /// Learner's `lr_step` gives, the step count goes on under it, and a record loaded through
    /// either is seen by both.
    #[test]
    fn the_learners_schedule_is_the_loops() {
        let schedule = LrSchedule {
            kind: LrSchedulerType::Linear,
            kwargs: Default::default(),
            peak: 1e-3,
            warmup: 0,
            total: 10,
            step: 0,
        };
        let looped = Shared::new(TrlSchedule {
            schedule: schedule.clone(),
            plateau_lr: None,
        });
        let mut learners = looped.clone();
        assert_eq!(learners.step(), schedule.lr_at(0));
        looped.lock().plateau_lr = Some(5e-4);
        assert_eq!(learners.step(), 5e-4);
        assert_eq!(LrScheduler::to_record::<NdArray>(&looped), 2);
        let _ = learners.load_record::<NdArray>(7);
        assert_eq!(looped.lock().schedule.step, 7);
    }
}
