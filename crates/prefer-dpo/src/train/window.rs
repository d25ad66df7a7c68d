//! The training log's window: the micro-batches and optimiser steps since the last log line, and
//! the row they make — TRL's metrics over the window's pairs, its mean loss, the last step's
//! gradient norm and learning rate, and tokens per second over the window's step time.

use super::{metrics_log::LogRecord, step::DpoOutput};
use crate::{loss::LossConfig, metrics::PairRecords};

/// Metrics of the optimiser steps since the last log line.
#[derive(Default)]
pub(crate) struct Window {
    records: PairRecords,
    loss_sum: f64,
    pairs: usize,
    tokens: usize,
    computed_tokens: usize,
    /// Wall time of the window's optimiser steps, from each step's first micro-batch to its
    /// parameter update (evaluation and checkpoints excluded).
    seconds: f64,
    grad_norm: f64,
    lr: f64,
}

impl Window {
    /// Counts a micro-batch.
    pub(crate) fn add(&mut self, out: &DpoOutput) {
        let n = out.records.len();
        self.loss_sum += out.loss * n as f64;
        self.pairs += n;
        self.tokens += out.tokens;
        self.computed_tokens += out.computed_tokens;
        self.records.extend(&out.records);
    }

    /// Closes an optimiser step: its wall time, gradient norm and learning rate.
    pub(crate) fn finish_step(&mut self, seconds: f64, grad_norm: f64, lr: f64) {
        self.seconds += seconds;
        self.grad_norm = grad_norm;
        self.lr = lr;
    }

    /// The log row of the steps since the last one, and a fresh window.
    pub(crate) fn take(&mut self, step: usize, epoch: f64, loss: &LossConfig) -> LogRecord {
        let mut values = self.records.metrics_of(loss.method, loss.beta);
        values.insert("loss".into(), self.loss_sum / self.pairs.max(1) as f64);
        values.insert("grad_norm".into(), self.grad_norm);
        values.insert("learning_rate".into(), self.lr);
        values.insert(
            "tokens_per_second".into(),
            self.tokens as f64 / self.seconds.max(1e-9),
        );
        values.insert("tokens".into(), self.tokens as f64);
        values.insert("tokens_computed".into(), self.computed_tokens as f64);
        *self = Window::default();
        LogRecord {
            step,
            epoch,
            values,
        }
    }
}
