//! The model's hyper-parameters, read from a Hugging Face `config.json` (transformers 4 or 5)
//! or built from GGUF metadata.

use std::path::Path;

use serde_json::Value;

use crate::error::{LoadError, Result};

/// How rotary frequencies are rescaled for contexts longer than training.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// The interpolation factor.
        factor: f64,
    },
    /// Llama 3.1's wavelength-dependent scaling.
    Llama3 {
        /// Scale for the low frequencies.
        factor: f64,
        /// Wavelengths longer than `original_max_position_embeddings / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths shorter than `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the model was pre-trained with.
        original_max_position_embeddings: f64,
    },
    /// Per-frequency divisors, as llama.cpp stores Llama 3.1 scaling (`rope_freqs.weight` in GGUF).
    FreqFactors(Vec<f32>),
}

/// Architecture of a Llama-family decoder (Llama, Mistral without sliding window, Qwen2, SmolLM).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Vocabulary size (rows of the embedding and of the LM head).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RoPE rescaling.
    pub rope_scaling: RopeScaling,
    /// The LM head shares the token embedding's weight.
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (Llama `attention_bias`, Qwen2).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama `attention_bias`).
    pub o_bias: bool,
    /// Biases on gate, up and down projections (`mlp_bias`).
    pub mlp_bias: bool,
    /// Beginning-of-sequence token id, if the model has one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids (generation stops at any of them).
    pub eos_token_ids: Vec<u32>,
    /// Padding token id, if declared.
    pub pad_token_id: Option<u32>,
}

impl LlamaConfig {
    /// A plain Llama of the given shape: head dim `hidden / heads`, default RoPE (θ = 10 000), RMS
    /// norm ε 1e-5, no biases, untied embeddings, 2048 positions, no special tokens — for models
    /// built in-process (tests, benchmarks, the built-in training job).
    pub fn plain(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
    ) -> Self {
        Self {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim: hidden_size / num_attention_heads.max(1),
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::Default,
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            bos_token_id: None,
            eos_token_ids: vec![],
            pad_token_id: None,
        }
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| LoadError::format(path, format!("invalid JSON: {e}")))?;
        Self::from_hf_json(&value, path)
    }

    /// Parses the JSON of a Hugging Face `config.json`; `path` is used in error messages.
    pub fn from_hf_json(v: &Value, path: &Path) -> Result<Self> {
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("llama");
        if !matches!(model_type, "llama" | "qwen2" | "mistral" | "smollm3" | "") {
            return Err(LoadError::config(
                path,
                format!(
                    "model_type `{model_type}` is not supported (supported: llama, qwen2, mistral)"
                ),
            ));
        }
        if model_type == "mistral" || model_type == "qwen2" {
            let sliding = v
                .get("use_sliding_window")
                .and_then(Value::as_bool)
                .unwrap_or(model_type == "mistral");
            let window = v.get("sliding_window").and_then(Value::as_u64);
            if sliding && window.is_some() {
                return Err(LoadError::config(
                    path,
                    "sliding-window attention is not supported",
                ));
            }
        }
        let req = |key: &str| -> Result<usize> {
            v.get(key)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| {
                    LoadError::config(
                        path,
                        format!("`{key}` is missing or not a positive integer"),
                    )
                })
        };
        let opt_usize = |key: &str| v.get(key).and_then(Value::as_u64).map(|x| x as usize);
        let opt_f64 = |key: &str| v.get(key).and_then(Value::as_f64);
        let opt_bool = |key: &str| v.get(key).and_then(Value::as_bool);

        let hidden_size = req("hidden_size")?;
        let num_attention_heads = req("num_attention_heads")?;
        let head_dim = opt_usize("head_dim").unwrap_or(hidden_size / num_attention_heads.max(1));
        let (rope_theta, rope_scaling) = parse_rope(v, path)?;
        let attention_bias = opt_bool("attention_bias").unwrap_or(false);
        let qwen = model_type == "qwen2";
        let config = Self {
            vocab_size: req("vocab_size")?,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers: req("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: opt_usize("num_key_value_heads").unwrap_or(num_attention_heads),
            head_dim,
            max_position_embeddings: opt_usize("max_position_embeddings").unwrap_or(2048),
            rms_norm_eps: opt_f64("rms_norm_eps").unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: opt_bool("tie_word_embeddings").unwrap_or(false),
            qkv_bias: attention_bias || qwen,
            o_bias: attention_bias,
            mlp_bias: opt_bool("mlp_bias").unwrap_or(false),
            bos_token_id: token_ids(v.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(v.get("eos_token_id")),
            pad_token_id: token_ids(v.get("pad_token_id")).first().copied(),
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Checks that the sizes fit together.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |m: String| Err(LoadError::config(path, m));
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
        ] {
            if value == 0 {
                return err(format!("`{name}` must be at least 1"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return err(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return err(format!(
                "head_dim ({}) must be even and positive",
                self.head_dim
            ));
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return err(format!("rope_theta ({}) must be positive", self.rope_theta));
        }
        Ok(())
    }

    /// The `config.json` transformers would write for this architecture (`LlamaForCausalLM`, or
    /// `Qwen2ForCausalLM` when only q/k/v carry biases), in transformers 5's `rope_parameters` style.
    pub fn to_hf_json(&self) -> Value {
        let qwen = self.qkv_bias && !self.o_bias;
        let mut rope = match &self.rope_scaling {
            RopeScaling::Default | RopeScaling::FreqFactors(_) => {
                serde_json::json!({"rope_type": "default"})
            }
            RopeScaling::Linear { factor } => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                serde_json::json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": *original_max_position_embeddings as u64})
            }
        };
        rope["rope_theta"] = serde_json::json!(self.rope_theta);
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => serde_json::json!(one),
            many => serde_json::json!(many),
        };
        serde_json::json!({
            "architectures": [if qwen { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
            "model_type": if qwen { "qwen2" } else { "llama" },
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.o_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
        })
    }

    /// Query heads per key/value head.
    pub fn n_rep(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

/// `bos_token_id`/`eos_token_id` may be an integer, a list of integers, or null.
fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// RoPE settings: transformers 5 writes `rope_parameters` (with `rope_theta` inside);
/// transformers 4 writes top-level `rope_theta` and an optional `rope_scaling`.
fn parse_rope(v: &Value, path: &Path) -> Result<(f64, RopeScaling)> {
    let params = v.get("rope_parameters").filter(|p| p.is_object());
    let scaling = params.or_else(|| v.get("rope_scaling").filter(|p| p.is_object()));
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .or_else(|| v.get("rope_theta").and_then(Value::as_f64))
        .unwrap_or(10_000.0);
    let Some(s) = scaling else {
        return Ok((theta, RopeScaling::Default));
    };
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        s.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| LoadError::config(path, format!("rope type `{kind}` needs `{key}`")))
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        other => {
            return Err(LoadError::config(
                path,
                format!(
                    "rope type `{other}` is not supported (supported: default, linear, llama3)"
                ),
            ));
        }
    };
    Ok((theta, scaling))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
               "num_attention_heads": 2, "num_key_value_heads": 1})
    }

    #[test]
    fn transformers5_rope_parameters() {
        let mut v = base();
        v["rope_parameters"] = json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5});
        let c = LlamaConfig::from_hf_json(&v, Path::new("config.json")).unwrap();
        assert_eq!(c.rope_theta, 5e5);
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(c.head_dim, 4);
    }

    #[test]
    fn transformers4_rope_scaling_with_legacy_type_key() {
        let mut v = base();
        v["rope_theta"] = json!(1234.0);
        v["rope_scaling"] = json!({"type": "linear", "factor": 4.0});
        let c = LlamaConfig::from_hf_json(&v, Path::new("config.json")).unwrap();
        assert_eq!(c.rope_theta, 1234.0);
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 4.0 });
    }

    #[test]
    fn errors_name_the_key() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = LlamaConfig::from_hf_json(&v, Path::new("dir/config.json"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "dir/config.json: `hidden_size` is missing or not a positive integer"
        );

        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        let e = LlamaConfig::from_hf_json(&v, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope type `yarn` is not supported"), "{e}");

        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        let e = LlamaConfig::from_hf_json(&v, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not a multiple of num_key_value_heads (3)"),
            "{e}"
        );
    }
}
