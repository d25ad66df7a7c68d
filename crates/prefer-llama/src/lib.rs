//! A Llama-style causal language model on Burn, generic over the backend, that loads Hugging Face
//! directories and llama.cpp GGUF files, with its tokenizer, chat template and generation.
//!
//! Data flows one way: checkpoint ([`loader`]) → [`LlamaModel`] → hidden states → LM head.
#![warn(missing_docs)]

pub mod attention;
pub mod chat_template;
pub mod checkpointing;
pub mod config;
pub mod error;
pub mod generate;
pub mod host;
pub mod kv_cache;
pub mod linear;
pub mod loader;
pub mod mlp;
pub mod model;
pub mod rope;
pub mod tokenizer;
pub mod weights;

#[cfg(test)]
mod test_util;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use config::{LlamaConfig, RopeScaling};
pub use error::{LoadError, Result};
pub use generate::{SamplingConfig, generate, generate_batch};
pub use host::DeviceReadError;
pub use linear::{
    DenseFactory, DenseLinear, LinearFactory, LinearLayer, LinearSite, LinearSpec, Projection,
    cast_to,
};
pub use loader::{Checkpoint, hub_cache, load_dense};
pub use model::{DenseLlama, LlamaModel};
pub use tokenizer::ChatTokenizer;
pub use weights::{HostTensor, MemoryWeights, RawTensor, WeightSource, fetch};
