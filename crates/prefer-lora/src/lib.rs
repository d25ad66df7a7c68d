//! LoRA adapters for prefer's Llama: PEFT's configuration names, initialisation and forward,
//! several named adapters over one frozen base, and adapter files in PEFT's format.
#![warn(missing_docs)]

pub mod config;
pub mod dora;
pub mod lora_linear;
pub mod merge;
pub mod peft;

pub use config::{ConfigError, LoraConfig};
pub use dora::DoraMagnitude;
pub use lora_linear::{LoraAdapter, LoraFactory, LoraLinear};
pub use merge::{MergeDtype, MergeError, merge_checkpoint};
pub use peft::{
    AdapterError, AdapterFactors, LoraModel, SiteFactors, load_peft, mix_adapter, peft_key,
    peft_magnitude_key, read_peft, save_peft, set_active_adapter, snapshot_adapter,
};
