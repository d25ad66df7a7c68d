//! llama.cpp GGUF files of the `llama` architecture: the config from metadata, tensors renamed to
//! Hugging Face names with llama.cpp's Q/K row permutation undone, and a tokenizer from metadata.

use std::{collections::HashMap, path::Path};

use serde_json::{Value, json};

use super::{
    Checkpoint,
    ggml_quants::{byte_size, dequantize, type_name},
    gguf_file::{GgufFile, GgufValue},
};
use crate::{
    chat_template::ChatTemplate,
    config::{LlamaConfig, RopeScaling},
    error::{LoadError, Result},
    tokenizer::ChatTokenizer,
    weights::{HostTensor, WeightSource},
};

/// Opens a GGUF file.
pub fn open(path: &Path) -> Result<Checkpoint> {
    let file = GgufFile::open(path)?;
    let config = config_from_metadata(&file)?;
    let tokenizer = if file.get("tokenizer.ggml.model").is_some() {
        Some(tokenizer_from_metadata(&file)?)
    } else {
        None
    };
    let source = GgufSource {
        names: hf_names(&file),
        file,
        n_head: config.num_attention_heads,
        n_kv: config.num_key_value_heads,
    };
    Ok(Checkpoint {
        config,
        weights: Box::new(source),
        tokenizer,
        path: path.to_path_buf(),
        quantization_config: None,
    })
}

fn config_from_metadata(f: &GgufFile) -> Result<LlamaConfig> {
    let arch = f
        .get("general.architecture")
        .and_then(GgufValue::as_str)
        .unwrap_or("");
    if arch != "llama" {
        return Err(LoadError::config(
            &f.path,
            format!("GGUF architecture `{arch}` is not supported (supported: llama)"),
        ));
    }
    let req = |key: &str| -> Result<usize> {
        f.get(&format!("llama.{key}"))
            .and_then(GgufValue::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| LoadError::config(&f.path, format!("metadata `llama.{key}` is missing")))
    };
    let hidden = req("embedding_length")?;
    let heads = req("attention.head_count")?;
    let n_vocab = f
        .get("llama.vocab_size")
        .and_then(GgufValue::as_u64)
        .map(|v| v as usize)
        .or_else(|| {
            f.get("tokenizer.ggml.tokens")
                .and_then(GgufValue::as_array)
                .map(<[_]>::len)
        })
        .or_else(|| {
            f.tensors
                .get("token_embd.weight")
                .and_then(|t| t.dims.get(1).copied())
        })
        .ok_or_else(|| LoadError::config(&f.path, "cannot tell the vocabulary size"))?;
    let head_dim = f
        .get("llama.attention.key_length")
        .or_else(|| f.get("llama.rope.dimension_count"))
        .and_then(GgufValue::as_u64)
        .map_or(hidden / heads.max(1), |v| v as usize);
    let rope_scaling = if let Some(t) = f.tensors.get("rope_freqs.weight") {
        let bytes = f.tensor_bytes(
            "rope_freqs.weight",
            t,
            byte_size(t.ggml_type, t.dims.iter().product()).unwrap_or(0),
        )?;
        RopeScaling::FreqFactors(dequantize(t.ggml_type, bytes))
    } else {
        match f.get("llama.rope.scaling.type").and_then(GgufValue::as_str) {
            None | Some("none") => RopeScaling::Default,
            Some("linear") => RopeScaling::Linear {
                factor: f
                    .get("llama.rope.scaling.factor")
                    .and_then(GgufValue::as_f64)
                    .unwrap_or(1.0),
            },
            Some(other) => {
                return Err(LoadError::config(
                    &f.path,
                    format!("rope scaling `{other}` is not supported"),
                ));
            }
        }
    };
    let token = |key: &str| {
        f.get(&format!("tokenizer.ggml.{key}"))
            .and_then(GgufValue::as_u64)
            .map(|v| v as u32)
    };
    let config = LlamaConfig {
        vocab_size: n_vocab,
        hidden_size: hidden,
        intermediate_size: req("feed_forward_length")?,
        num_hidden_layers: req("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: f
            .get("llama.attention.head_count_kv")
            .and_then(GgufValue::as_u64)
            .map_or(heads, |v| v as usize),
        head_dim,
        max_position_embeddings: req("context_length").unwrap_or(2048),
        rms_norm_eps: f
            .get("llama.attention.layer_norm_rms_epsilon")
            .and_then(GgufValue::as_f64)
            .unwrap_or(1e-5),
        rope_theta: f
            .get("llama.rope.freq_base")
            .and_then(GgufValue::as_f64)
            .unwrap_or(10_000.0),
        rope_scaling,
        tie_word_embeddings: !f.tensors.contains_key("output.weight"),
        qkv_bias: f.tensors.contains_key("blk.0.attn_q.bias"),
        o_bias: f.tensors.contains_key("blk.0.attn_output.bias"),
        mlp_bias: f.tensors.contains_key("blk.0.ffn_up.bias"),
        bos_token_id: token("bos_token_id"),
        eos_token_ids: token("eos_token_id")
            .into_iter()
            .chain(token("eot_token_id"))
            .collect(),
        pad_token_id: token("padding_token_id"),
    };
    config.validate(&f.path)?;
    Ok(config)
}

/// Hugging Face name → GGUF name for every tensor the model may ask for.
fn hf_names(f: &GgufFile) -> HashMap<String, String> {
    let mut map = HashMap::new();
    for name in f.tensors.keys() {
        let hf = match name.as_str() {
            "token_embd.weight" => Some("model.embed_tokens.weight".to_string()),
            "output_norm.weight" => Some("model.norm.weight".to_string()),
            "output.weight" => Some("lm_head.weight".to_string()),
            other => other.strip_prefix("blk.").and_then(|rest| {
                let (layer, tail) = rest.split_once('.')?;
                let (module, kind) = tail.rsplit_once('.')?;
                let hf_module = match module {
                    "attn_norm" => "input_layernorm",
                    "ffn_norm" => "post_attention_layernorm",
                    "attn_q" => "self_attn.q_proj",
                    "attn_k" => "self_attn.k_proj",
                    "attn_v" => "self_attn.v_proj",
                    "attn_output" => "self_attn.o_proj",
                    "ffn_gate" => "mlp.gate_proj",
                    "ffn_up" => "mlp.up_proj",
                    "ffn_down" => "mlp.down_proj",
                    _ => return None,
                };
                Some(format!("model.layers.{layer}.{hf_module}.{kind}"))
            }),
        };
        if let Some(hf) = hf {
            map.insert(hf, name.clone());
        }
    }
    map
}

struct GgufSource {
    file: GgufFile,
    names: HashMap<String, String>,
    n_head: usize,
    n_kv: usize,
}

impl WeightSource for GgufSource {
    fn take(&mut self, name: &str) -> Result<Option<HostTensor>> {
        let Some(gguf_name) = self.names.get(name) else {
            return Ok(None);
        };
        let info = &self.file.tensors[gguf_name];
        let n: usize = info.dims.iter().product();
        let size = byte_size(info.ggml_type, n).ok_or_else(|| LoadError::UnsupportedDtype {
            path: self.file.path.clone(),
            name: gguf_name.clone(),
            dtype: type_name(info.ggml_type),
            hint: " (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1; rows must be whole blocks of 32)"
                .into(),
        })?;
        let data = dequantize(
            info.ggml_type,
            self.file.tensor_bytes(gguf_name, info, size)?,
        );
        let shape: Vec<usize> = info.dims.iter().rev().copied().collect();
        let mut t = HostTensor::new(shape, data);
        if gguf_name.contains(".attn_q.") {
            t = unpermute(t, self.n_head);
        } else if gguf_name.contains(".attn_k.") {
            t = unpermute(t, self.n_kv);
        }
        Ok(Some(t))
    }

    fn origin(&self) -> &Path {
        &self.file.path
    }
}

/// Undoes llama.cpp's conversion permutation of Q/K rows: within each head, llama.cpp interleaves
/// the two rotary halves (row `2i + j` holds Hugging Face row `j·half + i`).
fn unpermute(t: HostTensor, n_heads: usize) -> HostTensor {
    let rows = t.shape[0];
    let cols: usize = t.shape[1..].iter().product();
    let head = rows / n_heads;
    let half = head / 2;
    let mut out = vec![0.0; t.data.len()];
    for h in 0..n_heads {
        for j in 0..2 {
            for i in 0..half {
                let dst = h * head + j * half + i;
                let src = h * head + 2 * i + j;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&t.data[src * cols..(src + 1) * cols]);
            }
        }
    }
    HostTensor::new(t.shape, out)
}

/// Builds a `tokenizers` tokenizer from `tokenizer.ggml.*` metadata, in the same JSON form that
/// Hugging Face's converters write, for `gpt2` (byte-level BPE with merges) and `llama`
/// (SentencePiece BPE with scores and byte fallback) vocabularies.
fn tokenizer_from_metadata(f: &GgufFile) -> Result<ChatTokenizer> {
    let ctx = format!("{}: tokenizer metadata", f.path.display());
    let err = |m: String| LoadError::tokenizer(ctx.clone(), m);
    let model = f
        .get("tokenizer.ggml.model")
        .and_then(GgufValue::as_str)
        .unwrap_or("");
    let tokens: Vec<String> = f
        .get("tokenizer.ggml.tokens")
        .and_then(GgufValue::as_array)
        .ok_or_else(|| err("`tokenizer.ggml.tokens` is missing".into()))?
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_owned())
        .collect();
    let types: Vec<u64> = f
        .get("tokenizer.ggml.token_type")
        .and_then(GgufValue::as_array)
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
        .unwrap_or_else(|| vec![1; tokens.len()]);
    let id = |key: &str| {
        f.get(&format!("tokenizer.ggml.{key}"))
            .and_then(GgufValue::as_u64)
            .map(|v| v as usize)
    };
    let text_of = |i: Option<usize>| i.and_then(|i| tokens.get(i).cloned());
    let (bos, eos, pad, unk) = (
        id("bos_token_id"),
        id("eos_token_id"),
        id("padding_token_id"),
        id("unknown_token_id"),
    );
    let add_bos = f
        .get("tokenizer.ggml.add_bos_token")
        .and_then(GgufValue::as_bool)
        .unwrap_or(model == "llama");

    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    // Control (3), unknown (2) and user-defined (4) tokens are matched whole in the text.
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(2..=4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[i] != 4})
        })
        .collect();
    let post = match (add_bos, bos) {
        (true, Some(b)) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": tokens[b], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": tokens[b], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": tokens[b], "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {tokens[b].clone(): {"id": tokens[b], "ids": [b], "tokens": [tokens[b]]}}
        }),
        _ => Value::Null,
    };
    let json = match model {
        "gpt2" => {
            let merges: Vec<Value> = f
                .get("tokenizer.ggml.merges")
                .and_then(GgufValue::as_array)
                .ok_or_else(|| {
                    err("`tokenizer.ggml.merges` is missing for a gpt2 vocabulary".into())
                })?
                .iter()
                .filter_map(|m| m.as_str()?.split_once(' ').map(|(a, b)| json!([a, b])))
                .collect();
            let pre = f
                .get("tokenizer.ggml.pre")
                .and_then(GgufValue::as_str)
                .unwrap_or("default");
            json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": null,
                "pre_tokenizer": bpe_pre_tokenizer(pre),
                "post_processor": post,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                          "ignore_merges": false, "vocab": vocab, "merges": merges}
            })
        }
        "llama" => {
            let scores: Vec<f64> = f
                .get("tokenizer.ggml.scores")
                .and_then(GgufValue::as_array)
                .ok_or_else(|| {
                    err("`tokenizer.ggml.scores` is missing for a llama vocabulary".into())
                })?
                .iter()
                .map(|v| v.as_f64().unwrap_or(0.0))
                .collect();
            json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                // SentencePiece's dummy prefix: "▁" before every text, even one starting with a space.
                "normalizer": {"type": "Sequence", "normalizers": [
                    {"type": "Prepend", "prepend": "▁"},
                    {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
                "pre_tokenizer": null,
                "post_processor": post,
                "decoder": {"type": "Sequence", "decoders": [
                    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                    {"type": "ByteFallback"}, {"type": "Fuse"},
                    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
                "model": {"type": "BPE", "dropout": null, "unk_token": text_of(unk), "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                          "ignore_merges": false, "vocab": vocab, "merges": spm_merges(&tokens, &types, &scores)}
            })
        }
        other => {
            return Err(err(format!(
                "tokenizer model `{other}` is not supported (supported: gpt2, llama)"
            )));
        }
    };
    let inner: tokenizers::Tokenizer = json.to_string().parse().map_err(|e| err(format!("{e}")))?;
    let chat_template = f
        .get("tokenizer.chat_template")
        .and_then(GgufValue::as_str)
        .map(|t| ChatTemplate::new(t.to_owned(), text_of(bos), text_of(eos)))
        .transpose()
        .map_err(|e| err(format!("chat template: {e}")))?;
    Ok(ChatTokenizer {
        inner,
        bos_token: text_of(bos),
        eos_token: text_of(eos),
        pad_token: text_of(pad),
        chat_template,
    })
}

/// The pre-tokeniser llama.cpp's `tokenizer.ggml.pre` names (GPT-2's regex for unknown names).
fn bpe_pre_tokenizer(pre: &str) -> Value {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            byte_level(false)]})
    };
    match pre {
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama3" | "llama-bpe" | "smaug-bpe" => split(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        "qwen2" | "deepseek-r1-qwen" => split(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        _ => byte_level(true),
    }
}

/// BPE merges equivalent to SentencePiece's score-driven merging: every split of a vocabulary
/// piece into two pieces of the vocabulary is a merge, ranked by the merged piece's score.
fn spm_merges(tokens: &[String], types: &[u64], scores: &[f64]) -> Vec<Value> {
    let index: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f64, usize, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types.get(id).copied().unwrap_or(1) != 1 {
            continue;
        }
        let score = scores.get(id).copied().unwrap_or(0.0);
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                merges.push((score, id, li, ri));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    merges
        .into_iter()
        .map(|(_, _, l, r)| json!([tokens[l], tokens[r]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: reshape(n_head, 2, half, cols).swapaxes(1, 2) — HF row (h, j, i) goes to (h, i, j).
        let (n_heads, head, cols) = (2, 4, 3);
        let hf: Vec<f32> = (0..n_heads * head * cols).map(|x| x as f32).collect();
        let mut gguf = vec![0.0; hf.len()];
        for h in 0..n_heads {
            for j in 0..2 {
                for i in 0..head / 2 {
                    let src = h * head + j * (head / 2) + i;
                    let dst = h * head + 2 * i + j;
                    gguf[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        let back = unpermute(HostTensor::new(vec![n_heads * head, cols], gguf), n_heads);
        assert_eq!(back.data, hf);
    }
}
