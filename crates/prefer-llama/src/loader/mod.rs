//! Opening checkpoints: Hugging Face directories and GGUF files.

mod ggml_quants;
mod gguf;
mod gguf_file;
mod hf;
pub mod hub_cache;
mod safetensors_source;

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;

pub use ggml_quants::{dequantize as ggml_dequantize, ggml_type, type_name as ggml_type_name};
pub use gguf_file::{GgufFile, GgufValue};
pub use safetensors_source::SafetensorsSource;

use crate::{
    config::LlamaConfig,
    error::{LoadError, Result},
    linear::{DenseFactory, LinearFactory, LinearLayer},
    model::LlamaModel,
    tokenizer::ChatTokenizer,
    weights::WeightSource,
};

/// An opened checkpoint: its config, a source of its tensors and its tokenizer.
pub struct Checkpoint {
    /// Architecture.
    pub config: LlamaConfig,
    /// The weights, read on demand.
    pub weights: Box<dyn WeightSource>,
    /// The tokenizer, if the checkpoint carries one.
    pub tokenizer: Option<ChatTokenizer>,
    /// Where it was opened from.
    pub path: PathBuf,
    /// `quantization_config` of a pre-quantised Hugging Face checkpoint.
    pub quantization_config: Option<serde_json::Value>,
}

impl Checkpoint {
    /// Whether the weights are stored as bitsandbytes 4-bit codes (`load_in_4bit` in `quantization_config`).
    pub fn is_bnb_4bit(&self) -> bool {
        self.quantization_config.as_ref().is_some_and(|q| {
            q.get("quant_method").and_then(|m| m.as_str()) == Some("bitsandbytes")
                && q.get("load_in_4bit").and_then(|m| m.as_bool()) == Some(true)
        })
    }
}

impl Checkpoint {
    /// Opens a Hugging Face model directory or a `.gguf` file.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_revision(path, "main")
    }

    /// Opens a Hugging Face directory, a `.gguf` file, or a Hub id (`org/name`) from the local
    /// Hugging Face cache at `revision` (a branch, tag or commit), offline. A path that exists is
    /// always a path.
    pub fn open_revision(path: &Path, revision: &str) -> Result<Self> {
        if !path.exists()
            && let Some(id) = path.to_str().filter(|s| hub_cache::is_hub_id(s))
        {
            let snapshot = hub_cache::resolve(id, hub_cache::RepoKind::Model, revision)?;
            return Self::open_revision(&snapshot, revision);
        }
        if path.is_dir() {
            hf::open(path)
        } else if path.is_file() {
            if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
            {
                gguf::open(path)
            } else {
                Err(LoadError::format(
                    path,
                    "expected a model directory or a .gguf file",
                ))
            }
        } else {
            Err(LoadError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ))
        }
    }

    /// Builds the model with the given projection layers.
    pub fn build<B: Backend, F: LinearFactory<B>>(
        &mut self,
        factory: &F,
        device: &B::Device,
    ) -> Result<LlamaModel<B, F::Layer>>
    where
        F::Layer: LinearLayer<B>,
    {
        LlamaModel::from_weights(&self.config, self.weights.as_mut(), factory, device)
    }
}

/// Loads a full-precision model and its tokenizer.
pub fn load_dense<B: prefer_kernels::FrozenMatmulBackend>(
    path: &Path,
    device: &B::Device,
) -> Result<(crate::model::DenseLlama<B>, Option<ChatTokenizer>)> {
    let mut ckpt = Checkpoint::open(path)?;
    let model = ckpt.build::<B, _>(&DenseFactory, device)?;
    Ok((model, ckpt.tokenizer))
}
