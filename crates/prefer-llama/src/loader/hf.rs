//! Hugging Face model directories: `config.json`, `model.safetensors` (or shards with
//! `model.safetensors.index.json`), `tokenizer.json`, `tokenizer_config.json`, `generation_config.json`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{Checkpoint, safetensors_source::SafetensorsSource};
use crate::{
    config::LlamaConfig,
    error::{LoadError, Result},
    tokenizer::ChatTokenizer,
};

/// Opens a Hugging Face directory.
pub fn open(dir: &Path) -> Result<Checkpoint> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(LoadError::format(
            dir,
            "not a model directory: config.json is missing",
        ));
    }
    let mut config = LlamaConfig::from_hf_file(&config_path)?;
    let quantization_config = std::fs::read_to_string(&config_path)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v.get("quantization_config").cloned());
    let files = weight_files(dir)?;
    let weights = SafetensorsSource::open(dir, &files)?;
    let tokenizer = if dir.join("tokenizer.json").is_file() {
        Some(ChatTokenizer::from_hf_dir(dir)?)
    } else {
        None
    };
    // generation_config.json may list more stop tokens than config.json (e.g. Llama 3's <|eot_id|>).
    let gen_path = dir.join("generation_config.json");
    if gen_path.is_file() {
        let text = std::fs::read_to_string(&gen_path).map_err(|e| LoadError::io(&gen_path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| LoadError::format(&gen_path, format!("invalid JSON: {e}")))?;
        let extra = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().into_iter().collect(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).collect(),
            _ => Vec::new(),
        };
        for id in extra {
            if !config.eos_token_ids.contains(&(id as u32)) {
                config.eos_token_ids.push(id as u32);
            }
        }
    }
    Ok(Checkpoint {
        config,
        weights: Box::new(weights),
        tokenizer,
        path: dir.to_path_buf(),
        quantization_config,
    })
}

/// The safetensors files of a directory: the single file, or every shard named by the index.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if !index_path.is_file() {
        return Err(LoadError::format(
            dir,
            "no weights: neither model.safetensors nor model.safetensors.index.json is present",
        ));
    }
    let text = std::fs::read_to_string(&index_path).map_err(|e| LoadError::io(&index_path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| LoadError::format(&index_path, format!("invalid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| LoadError::format(&index_path, "`weight_map` is missing"))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    files.sort();
    files.dedup();
    let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
    for f in &files {
        if !f.is_file() {
            return Err(LoadError::format(
                &index_path,
                format!("shard {} is missing", f.display()),
            ));
        }
    }
    Ok(files)
}
