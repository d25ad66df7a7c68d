//! bitsandbytes 4-bit checkpoints in the layout transformers serialises: per quantised Linear
//! `weight` (packed u8 `[n/2, 1]`), `weight.absmax` (u8 codes, or f32 without double quantisation),
//! `weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map` and
//! `weight.quant_state.bitsandbytes__nf4` (the quant state as JSON bytes), plus
//! `quantization_config` in `config.json`.

use std::path::{Path, PathBuf};

use prefer_llama::{
    Checkpoint, LinearSpec, LoadError, Projection, RawTensor, Result, WeightSource,
};
use serde_json::{Value, json};

use crate::{
    double_quant::{DYNAMIC_MAP_BITS, NESTED_BLOCKSIZE, dynamic_map},
    nf4::NF4_CODE,
    nf4_weight::{Absmax, Nf4Weight},
};

fn bad(origin: &Path, message: String) -> LoadError {
    LoadError::Format {
        path: origin.to_path_buf(),
        message,
    }
}

fn f32_vec(raw: &RawTensor) -> Option<Vec<f32>> {
    (raw.dtype == "F32").then(|| {
        raw.bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    })
}

/// Reads the bitsandbytes 4-bit weight of a projection, or `None` if the checkpoint stores it
/// unquantised.
pub fn read_bnb_weight(
    source: &mut dyn WeightSource,
    spec: &LinearSpec,
) -> Result<Option<Nf4Weight>> {
    let p = format!("{}.weight", spec.site.hf_path());
    let origin = source.origin().to_path_buf();
    let Some(state) = source.take_raw(&format!("{p}.quant_state.bitsandbytes__nf4"))? else {
        if source
            .take_raw(&format!("{p}.quant_state.bitsandbytes__fp4"))?
            .is_some()
        {
            return Err(bad(
                &origin,
                format!("`{p}` is FP4-quantised; only NF4 is supported"),
            ));
        }
        return Ok(None);
    };
    let state: Value = serde_json::from_slice(&state.bytes).map_err(|e| {
        bad(
            &origin,
            format!("`{p}.quant_state.bitsandbytes__nf4` is not valid JSON: {e}"),
        )
    })?;
    let blocksize = state["blocksize"].as_u64().unwrap_or(0) as usize;
    let shape: Vec<usize> = state["shape"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_u64)
                .map(|x| x as usize)
                .collect()
        })
        .unwrap_or_default();
    if shape != [spec.out_features, spec.in_features] {
        return Err(LoadError::Shape {
            path: origin.clone(),
            name: p,
            expected: vec![spec.out_features, spec.in_features],
            found: shape,
        });
    }
    let n = shape[0] * shape[1];
    let n_blocks = n.div_ceil(blocksize.max(1));
    let mut take = |suffix: &str| -> Result<RawTensor> {
        let name = format!("{p}{suffix}");
        source
            .take_raw(&name)?
            .ok_or_else(|| LoadError::MissingTensor {
                path: origin.clone(),
                name,
                expected: vec![],
            })
    };
    let packed = take("")?;
    let absmax = take(".absmax")?;
    let quant_map = take(".quant_map")?;
    if packed.dtype != "U8" || packed.bytes.len() != n.div_ceil(2) {
        return Err(bad(
            &origin,
            format!(
                "`{p}` must hold {} packed u8 codes, found {} {}",
                n.div_ceil(2),
                packed.bytes.len(),
                packed.dtype
            ),
        ));
    }
    if f32_vec(&quant_map).map(|m| {
        m.iter()
            .map(|x| x.to_bits())
            .eq(NF4_CODE.iter().map(|x| x.to_bits()))
    }) != Some(true)
    {
        return Err(bad(
            &origin,
            format!("`{p}.quant_map` is not the NF4 code table"),
        ));
    }
    let absmax = if let Some(offset) = state.get("nested_offset").and_then(Value::as_f64) {
        let nested = f32_vec(&take(".nested_absmax")?)
            .ok_or_else(|| bad(&origin, format!("`{p}.nested_absmax` must be F32")))?;
        let nested_map = f32_vec(&take(".nested_quant_map")?);
        if nested_map.map(|m| {
            m.iter()
                .map(|x| x.to_bits())
                .eq(DYNAMIC_MAP_BITS.iter().copied())
        }) != Some(true)
        {
            return Err(bad(
                &origin,
                format!("`{p}.nested_quant_map` is not bitsandbytes' dynamic map"),
            ));
        }
        if state["nested_blocksize"].as_u64() != Some(NESTED_BLOCKSIZE as u64) {
            return Err(bad(
                &origin,
                format!("`{p}`: nested block size must be {NESTED_BLOCKSIZE}"),
            ));
        }
        if absmax.dtype != "U8"
            || absmax.bytes.len() != n_blocks
            || nested.len() != n_blocks.div_ceil(NESTED_BLOCKSIZE)
        {
            return Err(bad(
                &origin,
                format!("`{p}.absmax`/`nested_absmax` do not fit {n_blocks} blocks"),
            ));
        }
        Absmax::Double {
            codes: absmax.bytes,
            nested_absmax: nested,
            offset: offset as f32,
        }
    } else {
        let v = f32_vec(&absmax).filter(|v| v.len() == n_blocks);
        Absmax::Plain(v.ok_or_else(|| {
            bad(
                &origin,
                format!("`{p}.absmax` must hold {n_blocks} f32 values"),
            )
        })?)
    };
    Ok(Some(Nf4Weight {
        shape: [shape[0], shape[1]],
        blocksize,
        packed: packed.bytes,
        absmax,
    }))
}

/// The tensors transformers writes for one quantised weight named `p` (`....q_proj.weight`).
pub fn bnb_tensors(p: &str, w: &Nf4Weight) -> Vec<(String, RawTensor)> {
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let raw = |dtype: &str, shape: Vec<usize>, bytes: Vec<u8>| RawTensor {
        dtype: dtype.into(),
        shape,
        bytes,
    };
    // bitsandbytes writes `json.dumps(quant_state)`: this key order, default separators.
    let mut state = format!(
        "{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"float32\", \"shape\": [{}, {}]",
        w.blocksize, w.shape[0], w.shape[1]
    );
    let mut out = vec![
        (
            p.to_string(),
            raw("U8", vec![w.packed.len(), 1], w.packed.clone()),
        ),
        (
            format!("{p}.quant_map"),
            raw("F32", vec![16], f32s(&NF4_CODE)),
        ),
    ];
    match &w.absmax {
        Absmax::Plain(a) => out.push((format!("{p}.absmax"), raw("F32", vec![a.len()], f32s(a)))),
        Absmax::Double {
            codes,
            nested_absmax,
            offset,
        } => {
            out.push((
                format!("{p}.absmax"),
                raw("U8", vec![codes.len()], codes.clone()),
            ));
            out.push((
                format!("{p}.nested_absmax"),
                raw("F32", vec![nested_absmax.len()], f32s(nested_absmax)),
            ));
            out.push((
                format!("{p}.nested_quant_map"),
                raw("F32", vec![256], f32s(&dynamic_map())),
            ));
            // Python prints the f64 value of the f32 offset in its shortest form, as Rust does.
            state += &format!(
                ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {:?}",
                *offset as f64
            );
        }
    }
    state.push('}');
    let text = state;
    out.push((
        format!("{p}.quant_state.bitsandbytes__nf4"),
        raw("U8", vec![text.len()], text.into_bytes()),
    ));
    out
}

/// The `quantization_config` transformers writes into `config.json`.
pub fn quantization_config(double_quant: bool) -> Value {
    json!({
        "_load_in_4bit": true, "_load_in_8bit": false, "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant, "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false, "llm_int8_skip_modules": null, "llm_int8_threshold": 6.0,
        "load_in_4bit": true, "load_in_8bit": false, "quant_method": "bitsandbytes"
    })
}

/// What `quantize_checkpoint` did.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeReport {
    /// Quantised Linear weights.
    pub quantized_tensors: usize,
    /// Their parameters.
    pub quantized_params: usize,
    /// Bytes of their codes and statistics.
    pub quantized_bytes: usize,
    /// Parameters kept in f32 (embeddings, norms, LM head, biases).
    pub full_precision_params: usize,
}

/// Writes a bitsandbytes NF4 checkpoint of the Hugging Face model in `src` into `dst`: every
/// decoder Linear quantised, the rest in f32, tokenizer files copied, `quantization_config` added.
/// Files are written under temporary names and renamed.
pub fn quantize_checkpoint(
    src: &Path,
    dst: &Path,
    blocksize: usize,
    double_quant: bool,
) -> Result<QuantizeReport> {
    let config_path = src.join("config.json");
    if !src.is_dir() || !config_path.is_file() {
        return Err(LoadError::Format {
            path: src.to_path_buf(),
            message: "expected a Hugging Face model directory (with config.json)".into(),
        });
    }
    let mut ckpt = Checkpoint::open(src)?;
    let c = ckpt.config.clone();
    let source = ckpt.weights.as_mut();
    let mut tensors: Vec<(String, RawTensor)> = Vec::new();
    let mut report = QuantizeReport {
        quantized_tensors: 0,
        quantized_params: 0,
        quantized_bytes: 0,
        full_precision_params: 0,
    };
    let mut keep = |name: String,
                    shape: Vec<usize>,
                    source: &mut dyn WeightSource,
                    report: &mut QuantizeReport|
     -> Result<()> {
        let t = prefer_llama::fetch(source, &name, &shape)?;
        report.full_precision_params += t.data.len();
        tensors.push((
            name,
            RawTensor {
                dtype: "F32".into(),
                shape,
                bytes: t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            },
        ));
        Ok(())
    };
    keep(
        "model.embed_tokens.weight".into(),
        vec![c.vocab_size, c.hidden_size],
        source,
        &mut report,
    )?;
    keep(
        "model.norm.weight".into(),
        vec![c.hidden_size],
        source,
        &mut report,
    )?;
    if !c.tie_word_embeddings {
        keep(
            "lm_head.weight".into(),
            vec![c.vocab_size, c.hidden_size],
            source,
            &mut report,
        )?;
    }
    let mut quantized = Vec::new();
    for i in 0..c.num_hidden_layers {
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            keep(
                format!("model.layers.{i}.{norm}.weight"),
                vec![c.hidden_size],
                source,
                &mut report,
            )?;
        }
        for projection in Projection::ALL {
            let spec = crate::spec_of(&c, i, projection);
            let (weight, bias) = spec.fetch_dense(source)?;
            let w = Nf4Weight::quantize(
                &weight.data,
                [spec.out_features, spec.in_features],
                blocksize,
                double_quant,
            )
            .map_err(|e| LoadError::Config {
                path: src.to_path_buf(),
                message: e.to_string(),
            })?;
            report.quantized_tensors += 1;
            report.quantized_params += w.len();
            report.quantized_bytes += w.storage_bytes();
            quantized.extend(bnb_tensors(&format!("{}.weight", spec.site.hf_path()), &w));
            if let Some(b) = bias {
                report.full_precision_params += b.data.len();
                let bytes = b.data.iter().flat_map(|x| x.to_le_bytes()).collect();
                quantized.push((
                    format!("{}.bias", spec.site.hf_path()),
                    RawTensor {
                        dtype: "F32".into(),
                        shape: b.shape,
                        bytes,
                    },
                ));
            }
        }
    }
    tensors.extend(quantized);
    std::fs::create_dir_all(dst).map_err(|e| LoadError::Io {
        path: dst.to_path_buf(),
        cause: e,
    })?;
    crate::safetensors_io::write_safetensors(&dst.join("model.safetensors"), &tensors)?;

    let text = std::fs::read_to_string(&config_path).map_err(|e| LoadError::Io {
        path: config_path.clone(),
        cause: e,
    })?;
    let mut config: Value = serde_json::from_str(&text).map_err(|e| LoadError::Format {
        path: config_path.clone(),
        message: format!("invalid JSON: {e}"),
    })?;
    config["quantization_config"] = quantization_config(double_quant);
    config["dtype"] = json!("float32");
    write_atomic(
        &dst.join("config.json"),
        serde_json::to_string_pretty(&config)
            .expect("JSON")
            .as_bytes(),
    )?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
        "special_tokens_map.json",
    ] {
        if src.join(f).is_file() {
            let bytes = std::fs::read(src.join(f)).map_err(|e| LoadError::Io {
                path: src.join(f),
                cause: e,
            })?;
            write_atomic(&dst.join(f), &bytes)?;
        }
    }
    Ok(report)
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp: PathBuf = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| LoadError::Io {
        path: tmp.clone(),
        cause: e,
    })?;
    std::fs::rename(&tmp, path).map_err(|e| LoadError::Io {
        path: path.to_path_buf(),
        cause: e,
    })
}
