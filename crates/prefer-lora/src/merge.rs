//! Merging an adapter into its base: a plain Hugging Face checkpoint (dequantised base + `scale·B·A`,
//! with DoRA each row then rescaled to its magnitude) that transformers loads without PEFT or
//! bitsandbytes.

use std::path::Path;

use prefer_llama::{Checkpoint, LoadError, Projection, RawTensor, fetch};
use prefer_quant::{bnb::read_bnb_weight, spec_of, write_safetensors};

use crate::peft::{AdapterError, SiteFactors, read_peft};

/// The dtype of the merged weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeDtype {
    /// 32-bit floats.
    F32,
    /// bfloat16 (round to nearest even).
    Bf16,
}

/// Merge failures: the checkpoint or the adapter.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// The base checkpoint.
    #[error(transparent)]
    Model(#[from] LoadError),
    /// The adapter.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
}

fn raw(shape: Vec<usize>, data: &[f32], dtype: MergeDtype) -> RawTensor {
    match dtype {
        MergeDtype::F32 => RawTensor {
            dtype: "F32".into(),
            shape,
            bytes: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        },
        MergeDtype::Bf16 => RawTensor {
            dtype: "BF16".into(),
            shape,
            bytes: data
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
        },
    }
}

/// Writes `base + adapter` as a Hugging Face directory in `output`. The base may be a Hugging Face
/// directory (full precision or bitsandbytes 4-bit) or a GGUF file.
pub fn merge_checkpoint(
    model: &Path,
    adapter: &Path,
    output: &Path,
    dtype: MergeDtype,
) -> Result<(), MergeError> {
    let mut ckpt = Checkpoint::open(model)?;
    let (lora, mut factors) = read_peft(adapter)?;
    let c = ckpt.config.clone();
    let source = ckpt.weights.as_mut();
    let mut tensors: Vec<(String, RawTensor)> = Vec::new();
    let mut keep = |name: String,
                    shape: Vec<usize>,
                    tensors: &mut Vec<(String, RawTensor)>|
     -> Result<(), MergeError> {
        let t = fetch(source, &name, &shape)?;
        tensors.push((name, raw(shape, &t.data, dtype)));
        Ok(())
    };
    keep(
        "model.embed_tokens.weight".into(),
        vec![c.vocab_size, c.hidden_size],
        &mut tensors,
    )?;
    keep(
        "model.norm.weight".into(),
        vec![c.hidden_size],
        &mut tensors,
    )?;
    if !c.tie_word_embeddings {
        keep(
            "lm_head.weight".into(),
            vec![c.vocab_size, c.hidden_size],
            &mut tensors,
        )?;
    }
    for i in 0..c.num_hidden_layers {
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            keep(
                format!("model.layers.{i}.{norm}.weight"),
                vec![c.hidden_size],
                &mut tensors,
            )?;
        }
    }
    let source = ckpt.weights.as_mut();
    let scaling = lora.scaling() as f32;
    for i in 0..c.num_hidden_layers {
        for projection in Projection::ALL {
            let spec = spec_of(&c, i, projection);
            let path = spec.site.hf_path();
            let (mut w, bias) = match read_bnb_weight(source, &spec)? {
                Some(q) => {
                    let bias = if spec.bias {
                        Some(fetch(
                            source,
                            &format!("{path}.bias"),
                            &[spec.out_features],
                        )?)
                    } else {
                        None
                    };
                    (q.dequantize(), bias)
                }
                None => {
                    let (w, b) = spec.fetch_dense(source)?;
                    (w.data, b)
                }
            };
            if let Some(SiteFactors { a, b, magnitude }) = factors.remove(&spec.site) {
                let (r, d_in, d_out) = (lora.r, spec.in_features, spec.out_features);
                let adapter_file = adapter.join("adapter_model.safetensors");
                for (key, t, expected) in [
                    (format!("{path}.lora_A.weight"), &a, [r, d_in]),
                    (format!("{path}.lora_B.weight"), &b, [d_out, r]),
                ] {
                    if t.shape != expected {
                        return Err(AdapterError::Shape {
                            path: adapter_file,
                            name: format!("base_model.model.{key}"),
                            expected: expected.to_vec(),
                            found: t.shape.clone(),
                        }
                        .into());
                    }
                }
                for o in 0..d_out {
                    let row = &mut w[o * d_in..(o + 1) * d_in];
                    for k in 0..r {
                        let s = b.data[o * r + k] * scaling;
                        for (x, av) in row.iter_mut().zip(&a.data[k * d_in..(k + 1) * d_in]) {
                            *x += s * av;
                        }
                    }
                    // DoRA: the adapted row, rescaled to its magnitude (norm in f64).
                    if let Some(m) = &magnitude {
                        let norm = row.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                        let scale = (m.data[o] as f64 / norm) as f32;
                        row.iter_mut().for_each(|x| *x *= scale);
                    }
                }
            }
            tensors.push((
                format!("{path}.weight"),
                raw(vec![spec.out_features, spec.in_features], &w, dtype),
            ));
            if let Some(b) = bias {
                tensors.push((format!("{path}.bias"), raw(b.shape.clone(), &b.data, dtype)));
            }
        }
    }
    if let Some(site) = factors.keys().next() {
        return Err(AdapterError::File {
            path: adapter.join("adapter_model.safetensors"),
            message: format!(
                "adapter targets layer {} but the model has {} layers",
                site.layer, c.num_hidden_layers
            ),
        }
        .into());
    }
    let io = |e: std::io::Error, p: &Path| LoadError::Io {
        path: p.to_path_buf(),
        cause: e,
    };
    std::fs::create_dir_all(output).map_err(|e| io(e, output))?;
    write_safetensors(&output.join("model.safetensors"), &tensors)?;
    let mut config = if model.is_dir() {
        let p = model.join("config.json");
        let text = std::fs::read_to_string(&p).map_err(|e| io(e, &p))?;
        serde_json::from_str(&text).map_err(|e| LoadError::Format {
            path: p,
            message: format!("invalid JSON: {e}"),
        })?
    } else {
        c.to_hf_json()
    };
    if let Some(obj) = config.as_object_mut() {
        obj.remove("quantization_config");
        obj.insert(
            "dtype".into(),
            serde_json::json!(if dtype == MergeDtype::F32 {
                "float32"
            } else {
                "bfloat16"
            }),
        );
    }
    let text = serde_json::to_string_pretty(&config).expect("JSON");
    std::fs::write(output.join("config.json"), text).map_err(|e| io(e, output))?;
    if model.is_dir() {
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
            "chat_template.jinja",
            "special_tokens_map.json",
        ] {
            if model.join(f).is_file() {
                std::fs::copy(model.join(f), output.join(f)).map_err(|e| io(e, &model.join(f)))?;
            }
        }
    } else if let Some(tok) = &ckpt.tokenizer {
        tok.inner
            .save(output.join("tokenizer.json"), false)
            .map_err(|e| LoadError::Tokenizer {
                context: output.display().to_string(),
                message: e.to_string(),
            })?;
        let mut tc = serde_json::json!({"bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token});
        if let Some(t) = &tok.chat_template {
            tc["chat_template"] = serde_json::json!(t.source());
        }
        std::fs::write(
            output.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&tc).expect("JSON"),
        )
        .map_err(|e| io(e, output))?;
    }
    Ok(())
}
