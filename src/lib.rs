//! prefer: preference optimisation (DPO and its relatives) for Llama-style language models,
//! in pure Rust on Burn, on any backend from one code path.
//!
//! This crate re-exports the workspace's libraries and chooses a backend at run time.
#![warn(missing_docs)]

pub mod allocator;
pub mod backend;
pub mod config_file;
pub mod data_source;
pub mod devices;
pub mod run_config;
pub mod training;
pub mod trl_keys;

pub use config_file::ConfigFile;
pub use run_config::{Loaded, RunConfig};

pub use prefer_dpo as dpo;
pub use prefer_kernels as kernels;
pub use prefer_llama as llama;
pub use prefer_lora as lora;
pub use prefer_quant as quant;
