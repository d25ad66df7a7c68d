//! Direct preference optimisation for prefer's Llama: preference data in TRL's and ShareGPT's
//! formats, per-sequence log-probs, every DPO-family loss of TRL 1.16 and its metrics.
#![warn(missing_docs)]

pub mod data;
pub mod eval;
pub mod host;
pub mod logps;
pub mod loss;
pub mod metrics;
pub mod pairs;
pub mod train;

pub use data::{DpoBatch, Packing};
pub use eval::{
    BatchEval, EvalError, EvalOptions, EvalReport, PairResult, evaluate_batch, evaluate_pairs,
};
pub use host::DeviceReadError;
pub use logps::{LogpsExtras, SequenceLogps, sequence_logps, sequence_logps_with};
pub use loss::{LossConfig, LossType, PairLogps, dpo_loss};
pub use metrics::PairRecords;
