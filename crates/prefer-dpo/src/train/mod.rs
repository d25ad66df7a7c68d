//! DPO training: TRL's `DPOTrainer` semantics over a LoRA adapter on a frozen (NF4 or dense) base,
//! with the reference as a frozen adapter snapshot over the same base, checkpoints that resume
//! bit-identically, and TRL's metrics in `metrics.jsonl` / `metrics.csv`.

pub mod bounds;
pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod data_parallel;
pub mod early_stopping;
pub mod learner;
pub mod machines;
pub mod metrics_log;
pub mod plan;
pub mod plateau;
pub mod preference_metric;
pub mod reference;
pub mod reference_sync;
pub mod schedule;
pub mod step;
pub mod trainer;
mod window;
pub mod wire;

use std::path::PathBuf;

pub use bounds::{BaseLayer, TrainBackend};
pub use checkpoint::{
    BestModel, POLICY_ADAPTER, REFERENCE_ADAPTER, TrainerState, latest_checkpoint, list_checkpoints,
};
pub use config::{
    ComputeDtype, ConfigError, IntervalStrategy, LrSchedulerKwargs, LrSchedulerType, QuantType,
    SaveStrategy, TrainConfig, WsdShape,
};
pub use data_parallel::Replica;
pub use early_stopping::{EarlyStopping, Progress};
pub use learner::{DpoLearner, Shared, TrlSchedule};
pub use machines::{Machines, Network};
pub use metrics_log::{LogRecord, MetricsLog, read_jsonl};
pub use plan::StepPlan;
pub use plateau::{Plateau, PlateauMode, PlateauOptions, ThresholdMode};
pub use preference_metric::PreferenceMetric;
pub use reference::{CACHE_FORMAT_VERSION, Fingerprint, RefLogps, cache_key, compute_ref_logps};
pub use schedule::LrSchedule;
pub use step::{DpoInput, DpoOutput, DpoPolicy};
pub use trainer::{
    ReferenceSource, Resume, Silent, Throughput, TrainObserver, TrainRun, TrainSummary, train,
    train_data_parallel, train_on_machines,
};

/// Why training stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A bad option.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data cannot be trained on.
    #[error("data: {0}")]
    Data(String),
    /// An adapter could not be read or written.
    #[error(transparent)]
    Adapter(#[from] prefer_lora::AdapterError),
    /// A result could not be read back from the device.
    #[error(transparent)]
    Device(#[from] crate::host::DeviceReadError),
    /// A checkpoint or log file could not be read or written.
    #[error("{path}: {message}")]
    Checkpoint {
        /// The file or directory.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Replicas could not exchange their values (this replica stopped, or another one did).
    #[error("replica {rank}: {message}")]
    Collective {
        /// The replica that reports it.
        rank: usize,
        /// What happened.
        message: String,
    },
    /// A replica of a data-parallel run failed; the others stopped.
    #[error("replica {rank} failed (the other replicas stopped): {source}")]
    Replica {
        /// Its rank.
        rank: usize,
        /// Its error.
        source: Box<TrainError>,
    },
    /// The loss or the gradient norm is NaN or infinite; the step was not applied.
    #[error(
        "step {step}: {metric} is {value}; training stopped before applying the step ({})",
        match last_checkpoint {
            Some(p) => format!("the last good checkpoint is {}", p.display()),
            None => "no checkpoint was saved yet".to_string(),
        }
    )]
    NonFinite {
        /// The optimiser step that failed.
        step: usize,
        /// `loss` or `grad_norm`.
        metric: String,
        /// Its value.
        value: f64,
        /// The newest checkpoint on disk.
        last_checkpoint: Option<PathBuf>,
    },
}

impl TrainError {
    /// Whether this is a replica stopping because another one did (not the run's cause).
    pub fn is_knock_on(&self) -> bool {
        matches!(self, Self::Collective { message, .. } if message.ends_with(data_parallel::STOPPED))
    }
}
