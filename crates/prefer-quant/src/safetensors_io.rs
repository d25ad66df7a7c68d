//! Writing safetensors files from raw tensors.

use std::{collections::HashMap, path::Path};

use prefer_llama::{LoadError, RawTensor, Result};
use safetensors::{Dtype, tensor::TensorView};

fn dtype(name: &str) -> Dtype {
    match name {
        "U8" => Dtype::U8,
        "BF16" => Dtype::BF16,
        "F16" => Dtype::F16,
        _ => Dtype::F32,
    }
}

/// Writes `tensors` (sorted by name, as PyTorch's writer does) with `{"format": "pt"}` metadata,
/// atomically.
pub fn write_safetensors(path: &Path, tensors: &[(String, RawTensor)]) -> Result<()> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, t)| {
            let view =
                TensorView::new(dtype(&t.dtype), t.shape.clone(), &t.bytes).map_err(|e| {
                    LoadError::Format {
                        path: path.to_path_buf(),
                        message: format!("tensor `{k}`: {e}"),
                    }
                })?;
            Ok((k.clone(), view))
        })
        .collect::<Result<_>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| LoadError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    crate::bnb::write_atomic(path, &bytes)
}
