//! Everything a training run is told, under the names TRL's `DPOConfig`, PEFT's `LoraConfig` and
//! transformers' `BitsAndBytesConfig` use, with their defaults — so a TRL user's settings carry over.

use std::path::PathBuf;

use prefer_llama::Projection;
use prefer_lora::LoraConfig;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{
    data::{Packing, TruncationMode},
    loss::{LossConfig, LossType},
};

/// The learning-rate schedule (`lr_scheduler_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedulerType {
    /// Warm up, then decay linearly to 0 (Hugging Face's default).
    Linear,
    /// Warm up, then half a cosine down to 0.
    Cosine,
    /// The peak rate throughout (no warm-up).
    Constant,
    /// Warm up, then the peak rate.
    ConstantWithWarmup,
}

/// The 4-bit data type (`bnb_4bit_quant_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantType {
    /// NormalFloat 4 (QLoRA's; the only one prefer implements).
    #[default]
    Nf4,
    /// bitsandbytes' 4-bit float: a known name that prefer refuses in [`TrainConfig::validate`].
    Fp4,
}

/// The compute dtype (`bnb_4bit_compute_dtype`); torch's spellings are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ComputeDtype {
    /// 32-bit floats (the only one prefer computes in).
    #[default]
    #[serde(rename = "float32", alias = "fp32", alias = "torch.float32")]
    Float32,
    /// 16-bit floats: refused in [`TrainConfig::validate`].
    #[serde(rename = "float16", alias = "fp16", alias = "torch.float16")]
    Float16,
    /// bfloat16: refused in [`TrainConfig::validate`].
    #[serde(rename = "bfloat16", alias = "bf16", alias = "torch.bfloat16")]
    Bfloat16,
}

impl ComputeDtype {
    /// The name as written in a config.
    pub fn name(self) -> &'static str {
        match self {
            Self::Float32 => "float32",
            Self::Float16 => "float16",
            Self::Bfloat16 => "bfloat16",
        }
    }
}

/// The options of DPO training: TRL's, PEFT's and bitsandbytes' names and defaults. The run's
/// inputs (model, data, adapter, reference model) and its backend are the façade's
/// (`prefer::RunConfig`, which reads both from one flat table).
///
/// Unknown keys are rejected ([`TrainConfig::keys`] lists the valid ones); an unknown value of an
/// option with fixed choices is an error listing them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    // --- where the run's outputs go ---
    /// Where the adapter, checkpoints, metrics and plots go (`output_dir`).
    pub output_dir: PathBuf,

    // --- DPO ---
    /// KL strength β.
    pub beta: f64,
    /// Loss types (TRL's names), added up with `loss_weights`.
    #[serde(deserialize_with = "list_of", serialize_with = "names_of")]
    pub loss_type: Vec<LossType>,
    /// Weights of `loss_type` (all 1 when absent).
    pub loss_weights: Option<Vec<f64>>,
    /// Label smoothing ε (conservative DPO).
    pub label_smoothing: f64,
    /// Compute the reference's log-probs once before training and cache them on disk.
    pub precompute_ref_log_probs: bool,
    /// Longest prompt + completion, in tokens.
    pub max_length: Option<usize>,
    /// Keep at most the last N prompt tokens.
    pub max_prompt_length: Option<usize>,
    /// Keep at most the first N tokens of each completion.
    pub max_completion_length: Option<usize>,
    /// `keep_start` or `keep_end`.
    pub truncation_mode: TruncationMode,
    /// Pack each micro-batch's sequences back to back instead of padding them, so compute follows
    /// the real tokens (TRL's `padding_free`). Unset: on for the CPU backends (faster there),
    /// off elsewhere.
    pub padding_free: Option<bool>,

    // --- optimisation (transformers' TrainingArguments) ---
    /// Peak learning rate (TRL's DPO default, 1e-6, suits full fine-tuning; LoRA wants ~1e-4..1e-3).
    pub learning_rate: f64,
    /// Passes over the training data (fractions allowed), unless `max_steps` > 0.
    pub num_train_epochs: f64,
    /// Optimiser steps to run; overrides `num_train_epochs` when > 0.
    pub max_steps: i64,
    /// Pairs per micro-batch.
    pub per_device_train_batch_size: usize,
    /// Pairs per evaluation batch.
    pub per_device_eval_batch_size: usize,
    /// Micro-batches per optimiser step; their gradients are averaged.
    pub gradient_accumulation_steps: usize,
    /// Schedule shape.
    pub lr_scheduler_type: LrSchedulerType,
    /// Warm-up optimiser steps (wins over `warmup_ratio` when > 0).
    pub warmup_steps: usize,
    /// Warm-up as a fraction of all optimiser steps.
    pub warmup_ratio: f64,
    /// Clip the global L2 norm of all trainable gradients to this (0 switches clipping off).
    pub max_grad_norm: f64,
    /// AdamW β₁.
    pub adam_beta1: f64,
    /// AdamW β₂.
    pub adam_beta2: f64,
    /// AdamW ε.
    pub adam_epsilon: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Log every N optimiser steps.
    pub logging_steps: usize,
    /// Evaluate every N optimiser steps (default: `logging_steps`); 0 evaluates only at the end.
    pub eval_steps: Option<usize>,
    /// Evaluate once before the first step (logged as step 0).
    pub eval_on_start: bool,
    /// Save a checkpoint every N optimiser steps (0: only the final adapter).
    pub save_steps: usize,
    /// Keep only the last N checkpoints.
    pub save_total_limit: Option<usize>,
    /// Seeds the adapter initialisation, dropout and the data order.
    pub seed: u64,
    /// Stop after this many evaluations without improvement of `metric_for_best_model`.
    pub early_stopping_patience: Option<usize>,
    /// Improvements smaller than this do not count.
    pub early_stopping_threshold: f64,
    /// The eval metric early stopping watches (TRL's name, e.g. `eval_loss`).
    pub metric_for_best_model: String,
    /// Whether a larger `metric_for_best_model` is better (default: false for losses, true otherwise).
    pub greater_is_better: Option<bool>,

    // --- LoRA (PEFT's LoraConfig) ---
    /// Adapter rank.
    pub r: usize,
    /// Scaling numerator (`lora_alpha / r`).
    pub lora_alpha: f64,
    /// Dropout on the adapter input.
    pub lora_dropout: f64,
    /// Projections with an adapter (`q_proj`, …, or `all-linear`).
    #[serde(deserialize_with = "list_of")]
    pub target_modules: Vec<String>,
    /// rsLoRA scaling `lora_alpha / √r`.
    pub use_rslora: bool,

    // --- quantisation (BitsAndBytesConfig) ---
    /// Quantise the frozen base to 4 bits while loading.
    pub load_in_4bit: bool,
    /// `nf4` (the only 4-bit type prefer implements).
    pub bnb_4bit_quant_type: QuantType,
    /// Quantise the NF4 block scales too.
    pub bnb_4bit_use_double_quant: bool,
    /// Compute dtype; prefer computes in `float32`.
    pub bnb_4bit_compute_dtype: ComputeDtype,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            output_dir: PathBuf::from("runs/dpo"),
            beta: 0.1,
            loss_type: vec![LossType::Sigmoid],
            loss_weights: None,
            label_smoothing: 0.0,
            precompute_ref_log_probs: false,
            max_length: Some(1024),
            max_prompt_length: None,
            max_completion_length: None,
            truncation_mode: TruncationMode::KeepStart,
            padding_free: None,
            learning_rate: 1e-6,
            num_train_epochs: 3.0,
            max_steps: -1,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            lr_scheduler_type: LrSchedulerType::Linear,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            max_grad_norm: 1.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 0.0,
            logging_steps: 10,
            eval_steps: None,
            eval_on_start: false,
            save_steps: 500,
            save_total_limit: None,
            seed: 42,
            early_stopping_patience: None,
            early_stopping_threshold: 0.0,
            metric_for_best_model: "eval_loss".into(),
            greater_is_better: None,
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            use_rslora: false,
            load_in_4bit: true,
            bnb_4bit_quant_type: QuantType::Nf4,
            bnb_4bit_use_double_quant: true,
            bnb_4bit_compute_dtype: ComputeDtype::Float32,
        }
    }
}

/// A setting that cannot work, naming the option.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("config: `{key}`: {message}")]
pub struct ConfigError {
    /// The option at fault.
    pub key: String,
    /// Why.
    pub message: String,
}

fn bad(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

impl TrainConfig {
    /// Every valid key, in declaration order.
    pub fn keys() -> Vec<String> {
        match serde_json::to_value(Self::default()) {
            Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// The loss options.
    pub fn loss(&self) -> LossConfig {
        LossConfig {
            beta: self.beta,
            loss_types: self.loss_type.clone(),
            loss_weights: self.loss_weights.clone(),
            label_smoothing: self.label_smoothing,
            ..Default::default()
        }
    }

    /// The adapter options.
    pub fn lora(&self) -> Result<LoraConfig, ConfigError> {
        let target_modules: Vec<Projection> = LoraConfig::parse_targets(&self.target_modules)
            .map_err(|e| bad("target_modules", e.0))?;
        let c = LoraConfig {
            r: self.r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            target_modules,
            use_rslora: self.use_rslora,
        };
        c.validate()
            .map_err(|e| bad("r / lora_alpha / lora_dropout", e.0))?;
        Ok(c)
    }

    /// The batch layout `padding_free` asks for (padded when unset).
    pub fn packing(&self) -> Packing {
        if self.padding_free == Some(true) {
            Packing::PaddingFree
        } else {
            Packing::Padded
        }
    }

    /// Checks every option before any work starts; the error names the option.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.loss().validate().map_err(|m| {
            let key = m.split_whitespace().next().unwrap_or("beta").to_string();
            bad(&key, m)
        })?;
        self.lora()?;
        let positive = [
            (
                "per_device_train_batch_size",
                self.per_device_train_batch_size,
            ),
            (
                "per_device_eval_batch_size",
                self.per_device_eval_batch_size,
            ),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            ),
            ("logging_steps", self.logging_steps),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(bad(key, "must be at least 1"));
            }
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(bad("learning_rate", "must be positive"));
        }
        if self.max_steps <= 0
            && !(self.num_train_epochs > 0.0 && self.num_train_epochs.is_finite())
        {
            return Err(bad(
                "num_train_epochs",
                "must be positive when max_steps is not set",
            ));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return Err(bad("warmup_ratio", "must be in [0, 1)"));
        }
        if self.max_grad_norm.is_nan() || self.max_grad_norm < 0.0 {
            return Err(bad("max_grad_norm", "must be 0 (off) or positive"));
        }
        for (key, b) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&b) {
                return Err(bad(key, "must be in [0, 1)"));
            }
        }
        if self.adam_epsilon.is_nan() || self.adam_epsilon <= 0.0 {
            return Err(bad("adam_epsilon", "must be positive"));
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return Err(bad("weight_decay", "must not be negative"));
        }
        if self.save_total_limit == Some(0) {
            return Err(bad("save_total_limit", "must be at least 1 when set"));
        }
        if let Some(max) = self.max_length {
            if max < 2 {
                return Err(bad("max_length", "must be at least 2"));
            }
            for (key, part) in [
                ("max_prompt_length", self.max_prompt_length),
                ("max_completion_length", self.max_completion_length),
            ] {
                if part.is_some_and(|p| p >= max) {
                    return Err(bad(key, format!("must be below max_length ({max})")));
                }
            }
        }
        if self.bnb_4bit_quant_type != QuantType::Nf4 {
            return Err(bad(
                "bnb_4bit_quant_type",
                "`fp4`: prefer implements nf4 only",
            ));
        }
        if self.bnb_4bit_compute_dtype != ComputeDtype::Float32 {
            return Err(bad(
                "bnb_4bit_compute_dtype",
                format!(
                    "`{}`: prefer computes in float32",
                    self.bnb_4bit_compute_dtype.name()
                ),
            ));
        }
        if self.early_stopping_patience == Some(0) {
            return Err(bad(
                "early_stopping_patience",
                "must be at least 1 when set",
            ));
        }
        if self.early_stopping_patience.is_some()
            && !self.metric_for_best_model.starts_with("eval_")
        {
            return Err(bad(
                "metric_for_best_model",
                "must name an eval metric (eval_loss, eval_rewards/accuracies, …)",
            ));
        }
        Ok(())
    }

    /// Whether a larger value of `metric_for_best_model` is better.
    pub fn greater_is_better(&self) -> bool {
        self.greater_is_better
            .unwrap_or(!self.metric_for_best_model.ends_with("loss"))
    }

    /// How often to evaluate, in optimiser steps (0: only at the end).
    pub fn eval_every(&self) -> usize {
        self.eval_steps.unwrap_or(self.logging_steps)
    }
}

/// Accepts a list, or one string with comma-separated items (as a command-line flag gives it).
fn list_of<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let items = match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        OneOrMany::Many(v) => v,
    };
    items
        .iter()
        .map(|s| s.parse::<T>().map_err(serde::de::Error::custom))
        .collect()
}

fn names_of<S: Serializer>(types: &[LossType], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(types.iter().map(|t| t.name()))
}
