//! Everything a training run is told, under the names TRL's `DPOConfig`, PEFT's `LoraConfig` and
//! transformers' `BitsAndBytesConfig` use, with their defaults — so a TRL user's settings carry over.

use std::path::PathBuf;

use prefer_llama::Projection;
use prefer_lora::LoraConfig;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::plateau::{PlateauMode, ThresholdMode};
use crate::{
    data::{Packing, TruncationMode},
    loss::{FDivergence, FDivergenceType, LossConfig, LossType, Method},
};

/// The learning-rate schedule (`lr_scheduler_type`): Hugging Face's `SchedulerType` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedulerType {
    /// Warm up, then decay linearly to 0 (Hugging Face's default).
    Linear,
    /// Warm up, then a cosine down to 0 (`num_cycles` waves, half a wave by default).
    Cosine,
    /// Warm up, then `num_cycles` (1) cosines from the peak to 0, each restarting at the peak.
    CosineWithRestarts,
    /// Warm up, then a polynomial of `power` (1) from the peak down to `lr_end` (1e-7).
    Polynomial,
    /// The peak rate throughout (no warm-up).
    Constant,
    /// Warm up, then the peak rate.
    ConstantWithWarmup,
    /// Warm up, then the peak × 1/√((step + timescale − warmup) / timescale).
    InverseSqrt,
    /// Warm up, then a cosine down to `min_lr` (or `min_lr_rate` × the peak).
    CosineWithMinLr,
    /// Warm up, hold the peak, then decay over `num_decay_steps` to `min_lr_ratio` × the peak.
    WarmupStableDecay,
    /// The peak (no warm-up), cut by `factor` whenever `metric_for_best_model` stops improving
    /// for more than `patience` evaluations.
    ReduceLrOnPlateau,
}

/// The shape of a `warmup_stable_decay` warm-up or decay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WsdShape {
    /// A straight line.
    #[serde(rename = "linear")]
    Linear,
    /// Half a cosine.
    #[serde(rename = "cosine")]
    Cosine,
    /// 1 − √progress.
    #[serde(rename = "1-sqrt")]
    OneMinusSqrt,
}

/// The schedule's own arguments (`lr_scheduler_kwargs`), as `get_scheduler` takes them; each
/// schedule reads its own and refuses the others.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LrSchedulerKwargs {
    /// Cosine waves: `cosine`, `cosine_with_min_lr`, `warmup_stable_decay` (0.5),
    /// `cosine_with_restarts` (1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_cycles: Option<f64>,
    /// `cosine_with_min_lr`: the rate it ends at; `reduce_lr_on_plateau`: the lowest rate (0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_lr: Option<f64>,
    /// `cosine_with_min_lr`: the rate it ends at, as a fraction of the peak.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_lr_rate: Option<f64>,
    /// `polynomial`: the rate it ends at (1e-7).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr_end: Option<f64>,
    /// `polynomial`: the power (1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power: Option<f64>,
    /// `inverse_sqrt`: the time scale (default: the warm-up steps, or 10 000 without warm-up).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timescale: Option<f64>,
    /// `warmup_stable_decay`: steps of the decay (required).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_decay_steps: Option<usize>,
    /// `warmup_stable_decay`: steps at the peak (default: what warm-up and decay leave).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_stable_steps: Option<usize>,
    /// `warmup_stable_decay`: the warm-up's shape (linear).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_type: Option<WsdShape>,
    /// `warmup_stable_decay`: the decay's shape (cosine).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decay_type: Option<WsdShape>,
    /// `warmup_stable_decay`: the floor, as a fraction of the peak (0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_lr_ratio: Option<f64>,
    /// `reduce_lr_on_plateau`: `min` (lower is better, the default) or `max`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<PlateauMode>,
    /// `reduce_lr_on_plateau`: the rate's multiplier at a plateau (0.1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// `reduce_lr_on_plateau`: evaluations without improvement tolerated (10).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patience: Option<usize>,
    /// `reduce_lr_on_plateau`: the least change that counts as an improvement (1e-4).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// `reduce_lr_on_plateau`: `rel` (the default) or `abs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold_mode: Option<ThresholdMode>,
    /// `reduce_lr_on_plateau`: evaluations after a cut that are not counted (0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cooldown: Option<usize>,
    /// `reduce_lr_on_plateau`: the smallest cut made (1e-8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
}

impl LrSchedulerKwargs {
    /// The keys that are set.
    fn set_keys(&self) -> Vec<String> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// Checks that `kind` takes every key that is set, and the values it needs.
    pub fn check(&self, kind: LrSchedulerType) -> Result<(), String> {
        use LrSchedulerType as K;
        let takes: &[&str] = match kind {
            K::Linear | K::Constant | K::ConstantWithWarmup => &[],
            K::Cosine | K::CosineWithRestarts => &["num_cycles"],
            K::Polynomial => &["lr_end", "power"],
            K::InverseSqrt => &["timescale"],
            K::CosineWithMinLr => &["num_cycles", "min_lr", "min_lr_rate"],
            K::WarmupStableDecay => &[
                "num_cycles",
                "num_decay_steps",
                "num_stable_steps",
                "warmup_type",
                "decay_type",
                "min_lr_ratio",
            ],
            K::ReduceLrOnPlateau => &[
                "mode",
                "factor",
                "patience",
                "threshold",
                "threshold_mode",
                "cooldown",
                "min_lr",
                "eps",
            ],
        };
        if let Some(extra) = self
            .set_keys()
            .into_iter()
            .find(|k| !takes.contains(&k.as_str()))
        {
            let name = serde_json::to_value(kind)
                .ok()
                .and_then(|v| v.as_str().map(String::from));
            return Err(format!(
                "`{extra}` is not an argument of the {} schedule (it takes {})",
                name.unwrap_or_default(),
                if takes.is_empty() {
                    "none".to_string()
                } else {
                    takes.join(", ")
                }
            ));
        }
        match kind {
            K::CosineWithMinLr if self.min_lr.is_some() == self.min_lr_rate.is_some() => {
                Err("cosine_with_min_lr needs one of min_lr and min_lr_rate".into())
            }
            K::WarmupStableDecay if self.num_decay_steps.is_none() => {
                Err("warmup_stable_decay needs num_decay_steps".into())
            }
            K::InverseSqrt if self.timescale.is_some_and(|t| t <= 0.0) => {
                Err("timescale must be positive".into())
            }
            K::ReduceLrOnPlateau if self.factor.is_some_and(|f| !(0.0..1.0).contains(&f)) => {
                Err("reduce_lr_on_plateau: factor must be in [0, 1)".into())
            }
            _ => Ok(()),
        }
    }
}

/// When something happens (`eval_strategy`, `logging_strategy`): transformers' `IntervalStrategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntervalStrategy {
    /// Never.
    No,
    /// Every N optimiser steps (`eval_steps`, `logging_steps`) and after the last.
    Steps,
    /// At the end of each epoch.
    Epoch,
}

/// When checkpoints are written (`save_strategy`): transformers' `SaveStrategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SaveStrategy {
    /// Never (the final adapter is still written).
    No,
    /// Every `save_steps` optimiser steps.
    Steps,
    /// At the end of each epoch.
    Epoch,
    /// After each evaluation that improves `metric_for_best_model`.
    Best,
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
    /// 32-bit floats.
    #[default]
    #[serde(rename = "float32", alias = "fp32", alias = "torch.float32")]
    Float32,
    /// IEEE half precision (`fp16`).
    #[serde(rename = "float16", alias = "fp16", alias = "torch.float16")]
    Float16,
    /// bfloat16 (`bf16`).
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

    /// Burn's floating type of this name.
    pub fn float_dtype(self) -> burn::tensor::FloatDType {
        match self {
            Self::Float32 => burn::tensor::FloatDType::F32,
            Self::Float16 => burn::tensor::FloatDType::F16,
            Self::Bfloat16 => burn::tensor::FloatDType::BF16,
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

    // --- the method ---
    /// The preference method: `dpo` or `kto` (against a reference), or `cpo`, `simpo`, `orpo`,
    /// which need no reference (none is built or run). `kto` trains on unpaired examples
    /// (`{"prompt", "completion", "label"}` rows, or preference pairs split into a desirable and
    /// an undesirable example each, as TRL's `unpair_preference_dataset`).
    pub method: Method,
    /// CPO/SimPO: the weight of the chosen completions' NLL (TRL's `cpo_alpha`; unset: 1 for
    /// `cpo`, 0 for `simpo`).
    pub cpo_alpha: Option<f64>,
    /// SimPO's target reward margin γ (TRL's `simpo_gamma`).
    pub simpo_gamma: f64,
    /// KTO's weight of desirable examples (TRL's `desirable_weight`); with `undesirable_weight`,
    /// balances classes of unequal size (the KTO paper keeps `w_d·n_d / (w_u·n_u)` in [1, 4/3]).
    pub desirable_weight: f64,
    /// KTO's weight of undesirable examples (TRL's `undesirable_weight`).
    pub undesirable_weight: f64,

    // --- DPO ---
    /// KL strength β (ORPO's λ; CPO's and SimPO's β).
    pub beta: f64,
    /// Loss types (TRL's names), added up with `loss_weights`.
    #[serde(deserialize_with = "list_of", serialize_with = "names_of")]
    pub loss_type: Vec<LossType>,
    /// Weights of `loss_type` (all 1 when absent).
    pub loss_weights: Option<Vec<f64>>,
    /// Label smoothing ε (conservative DPO).
    pub label_smoothing: f64,
    /// Temperature of the `discopop` loss's blend.
    pub discopop_tau: f64,
    /// RPO: add alpha × the chosen completion's mean NLL to the loss (TRL 0.x's `rpo_alpha`; the
    /// same as appending `sft` to `loss_type` with weight alpha, TRL 1.x's spelling).
    pub rpo_alpha: Option<f64>,
    /// LD-DPO: the weight of each pair's completion tokens past its shorter completion (in [0, 1];
    /// unset: standard DPO).
    pub ld_alpha: Option<f64>,
    /// WPO: weigh each pair's loss by the policy's own probability of the pair, so off-policy
    /// pairs count less.
    pub use_weighting: bool,
    /// f-DPO's divergence to the reference (`reverse_kl`: standard DPO).
    pub f_divergence_type: FDivergenceType,
    /// α of `f_divergence_type = "alpha_divergence"`.
    pub f_alpha_divergence_coef: f64,
    /// Compute the reference's log-probs once before training and cache them on disk.
    pub precompute_ref_log_probs: bool,
    /// TR-DPO (Gorbatovski et al. 2024): every `ref_model_sync_steps` optimiser steps the
    /// reference moves towards the policy, `ref ← α·policy + (1 − α)·ref` with α =
    /// `ref_model_mixup_alpha`, so the policy is held close to a recent self rather than to its
    /// start. Needs the snapshot reference (no `ref_model`, no precomputed log-probs).
    pub sync_ref_model: bool,
    /// α of `sync_ref_model`: how far the reference moves towards the policy at each sync.
    pub ref_model_mixup_alpha: f64,
    /// Optimiser steps between reference syncs.
    pub ref_model_sync_steps: usize,
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
    /// Activation checkpointing: each decoder layer keeps only its input in the forward pass and
    /// recomputes its activations in the backward (about one more forward pass of the layers for
    /// one layer's activations instead of all of them). The same gradients.
    pub gradient_checkpointing: bool,

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
    /// The schedule's own arguments (`num_cycles`, `min_lr`, `lr_end`, `power`, …).
    pub lr_scheduler_kwargs: LrSchedulerKwargs,
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
    /// When training metrics are logged: `steps` (every `logging_steps` and after the last),
    /// `epoch` or `no`.
    pub logging_strategy: IntervalStrategy,
    /// Log every N optimiser steps.
    pub logging_steps: usize,
    /// Also log after the first optimiser step.
    pub logging_first_step: bool,
    /// When to evaluate: `no`, `steps` (every `eval_steps` and after the last) or `epoch`. Unset:
    /// `steps` when there are held-out pairs (TRL's default is `no`, which evaluates never).
    pub eval_strategy: Option<IntervalStrategy>,
    /// Evaluate every N optimiser steps (default: `logging_steps`); 0 evaluates only at the end.
    pub eval_steps: Option<usize>,
    /// Evaluate once before the first step (logged as step 0).
    pub eval_on_start: bool,
    /// When to write checkpoints: `steps` (every `save_steps`), `epoch`, `best` (when an
    /// evaluation improves `metric_for_best_model`) or `no`.
    pub save_strategy: SaveStrategy,
    /// Save a checkpoint every N optimiser steps (0: only the final adapter).
    pub save_steps: usize,
    /// Keep only the last N checkpoints.
    pub save_total_limit: Option<usize>,
    /// Seeds the adapter initialisation, dropout and the data order.
    pub seed: u64,
    /// Write the adapter of the checkpoint with the best `metric_for_best_model` as the final one
    /// (checkpoints must be saved at evaluations: the same strategy, save steps a multiple of eval
    /// steps); that checkpoint is never rotated out by `save_total_limit`.
    pub load_best_model_at_end: bool,
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
    /// Dropout on the adapter input (saved in the adapter's config; off in training while
    /// `disable_dropout` is set, as in TRL).
    pub lora_dropout: f64,
    /// Switch every dropout off while training (TRL's default).
    pub disable_dropout: bool,
    /// Projections with an adapter (`q_proj`, …, or `all-linear`).
    #[serde(deserialize_with = "list_of")]
    pub target_modules: Vec<String>,
    /// rsLoRA scaling `lora_alpha / √r`.
    pub use_rslora: bool,
    /// DoRA: a trained magnitude per output row of each adapted projection.
    pub use_dora: bool,

    // --- quantisation (BitsAndBytesConfig) ---
    /// Quantise the frozen base to 4 bits while loading.
    pub load_in_4bit: bool,
    /// `nf4` (the only 4-bit type prefer implements).
    pub bnb_4bit_quant_type: QuantType,
    /// Quantise the NF4 block scales too.
    pub bnb_4bit_use_double_quant: bool,
    /// The type the dequantised weights and, without `bf16`/`fp16`, the whole forward and backward
    /// pass compute in (`float32`, `bfloat16`, `float16`).
    pub bnb_4bit_compute_dtype: ComputeDtype,

    // --- precision (TrainingArguments) ---
    /// Compute in bfloat16: the decoder layers' activations and matmuls; LoRA factors and AdamW
    /// state stay f32 (master weights), log-probs, sums and the loss f32.
    pub bf16: bool,
    /// Compute in IEEE half precision, as `bf16` does in bfloat16.
    pub fp16: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            output_dir: PathBuf::from("runs/dpo"),
            method: Method::Dpo,
            cpo_alpha: None,
            simpo_gamma: 0.5,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            beta: 0.1,
            loss_type: vec![LossType::Sigmoid],
            loss_weights: None,
            label_smoothing: 0.0,
            discopop_tau: 0.05,
            rpo_alpha: None,
            ld_alpha: None,
            use_weighting: false,
            f_divergence_type: FDivergenceType::ReverseKl,
            f_alpha_divergence_coef: 0.5,
            precompute_ref_log_probs: false,
            sync_ref_model: false,
            ref_model_mixup_alpha: 0.6,
            ref_model_sync_steps: 512,
            max_length: Some(1024),
            max_prompt_length: None,
            max_completion_length: None,
            truncation_mode: TruncationMode::KeepStart,
            padding_free: None,
            gradient_checkpointing: false,
            learning_rate: 1e-6,
            num_train_epochs: 3.0,
            max_steps: -1,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            lr_scheduler_type: LrSchedulerType::Linear,
            lr_scheduler_kwargs: LrSchedulerKwargs::default(),
            warmup_steps: 0,
            warmup_ratio: 0.0,
            max_grad_norm: 1.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 0.0,
            logging_strategy: IntervalStrategy::Steps,
            logging_steps: 10,
            logging_first_step: false,
            eval_strategy: None,
            eval_steps: None,
            eval_on_start: false,
            save_strategy: SaveStrategy::Steps,
            save_steps: 500,
            save_total_limit: None,
            seed: 42,
            load_best_model_at_end: false,
            early_stopping_patience: None,
            early_stopping_threshold: 0.0,
            metric_for_best_model: "eval_loss".into(),
            greater_is_better: None,
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            disable_dropout: true,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            use_rslora: false,
            use_dora: false,
            load_in_4bit: true,
            bnb_4bit_quant_type: QuantType::Nf4,
            bnb_4bit_use_double_quant: true,
            bnb_4bit_compute_dtype: ComputeDtype::Float32,
            bf16: false,
            fp16: false,
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
        let (mut loss_types, mut loss_weights) =
            (self.loss_type.clone(), self.loss_weights.clone());
        // RPO (TRL 0.x's `rpo_alpha`): the NLL of the chosen completion, weighted by alpha, on top.
        if let Some(alpha) = self.rpo_alpha {
            let mut weights = loss_weights.unwrap_or_else(|| vec![1.0; loss_types.len()]);
            weights.push(alpha);
            loss_types.push(LossType::Sft);
            loss_weights = Some(weights);
        }
        LossConfig {
            beta: self.beta,
            loss_types,
            loss_weights,
            label_smoothing: self.label_smoothing,
            discopop_tau: self.discopop_tau,
            f_divergence: FDivergence {
                kind: self.f_divergence_type,
                alpha: self.f_alpha_divergence_coef,
            },
            ld_alpha: self.ld_alpha,
            use_weighting: self.use_weighting,
            method: self.method,
            cpo_alpha: self
                .cpo_alpha
                .unwrap_or_else(|| self.method.default_cpo_alpha()),
            simpo_gamma: self.simpo_gamma,
            desirable_weight: self.desirable_weight,
            undesirable_weight: self.undesirable_weight,
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
            use_dora: self.use_dora,
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
        // First: a method's own refusals name the key better than the loss they would build.
        self.validate_method()?;
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
        self.lr_scheduler_kwargs
            .check(self.lr_scheduler_type)
            .map_err(|m| bad("lr_scheduler_kwargs", m))?;
        if self.lr_scheduler_type == LrSchedulerType::Polynomial
            && self.lr_scheduler_kwargs.lr_end.unwrap_or(1e-7) >= self.learning_rate
        {
            return Err(bad(
                "lr_scheduler_kwargs",
                "polynomial: lr_end must be below learning_rate",
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
        self.validate_precision()?;
        if self.early_stopping_patience == Some(0) {
            return Err(bad(
                "early_stopping_patience",
                "must be at least 1 when set",
            ));
        }
        if let Some(alpha) = self.rpo_alpha {
            if !(alpha >= 0.0 && alpha.is_finite()) {
                return Err(bad("rpo_alpha", "must be a non-negative number"));
            }
            if self.loss_type.contains(&LossType::Sft) {
                return Err(bad(
                    "rpo_alpha",
                    "`sft` is already in loss_type: weight it with loss_weights instead",
                ));
            }
        }
        if !(self.discopop_tau > 0.0 && self.discopop_tau.is_finite()) {
            return Err(bad("discopop_tau", "must be positive"));
        }
        self.validate_reference_sync()?;
        self.validate_best_model()
    }

    /// The floating type the model computes in: `bf16` or `fp16` when one is set (TRL's mixed
    /// precision), else `bnb_4bit_compute_dtype`. [`Self::validate`] refuses the two flags
    /// together and a flag that contradicts a half-precision `bnb_4bit_compute_dtype`.
    pub fn compute_dtype(&self) -> ComputeDtype {
        match (self.bf16, self.fp16) {
            (true, _) => ComputeDtype::Bfloat16,
            (_, true) => ComputeDtype::Float16,
            _ => self.bnb_4bit_compute_dtype,
        }
    }

    /// Whether backend `B` on `device` computes in [`Self::compute_dtype`]; the error names the
    /// key that asked for it and the backend.
    pub fn check_backend<B: burn::tensor::backend::Backend>(
        &self,
        device: &B::Device,
    ) -> Result<(), ConfigError> {
        let dtype = self.compute_dtype();
        if B::supports_dtype(device, dtype.float_dtype().into()) {
            return Ok(());
        }
        let key = match (self.bf16, self.fp16) {
            (true, _) => "bf16",
            (_, true) => "fp16",
            _ => "bnb_4bit_compute_dtype",
        };
        Err(bad(
            key,
            format!(
                "backend {} cannot compute in {}: use flex (the CPU default) or a GPU backend \
                 (wgpu has no bfloat16), or compute in float32",
                B::name(device),
                dtype.name()
            ),
        ))
    }

    fn validate_precision(&self) -> Result<(), ConfigError> {
        if self.bf16 && self.fp16 {
            return Err(bad(
                "fp16",
                "bf16 is set too: choose one half-precision type",
            ));
        }
        let flag = match (self.bf16, self.fp16) {
            (true, _) => Some(("bf16", ComputeDtype::Bfloat16)),
            (_, true) => Some(("fp16", ComputeDtype::Float16)),
            _ => None,
        };
        if let Some((key, dtype)) = flag
            && self.bnb_4bit_compute_dtype != ComputeDtype::Float32
            && self.bnb_4bit_compute_dtype != dtype
        {
            return Err(bad(
                "bnb_4bit_compute_dtype",
                format!(
                    "`{}` contradicts {key} = true (which computes in {}): set one of them",
                    self.bnb_4bit_compute_dtype.name(),
                    dtype.name()
                ),
            ));
        }
        Ok(())
    }

    /// A reference-free method refuses the options that only make sense with a reference, and
    /// the methods' own options apply to their method only.
    fn validate_method(&self) -> Result<(), ConfigError> {
        let method = self.method;
        if !method.uses_reference() {
            for (key, set) in [
                ("precompute_ref_log_probs", self.precompute_ref_log_probs),
                ("sync_ref_model", self.sync_ref_model),
                ("rpo_alpha", self.rpo_alpha.is_some()),
            ] {
                if set {
                    return Err(bad(
                        key,
                        format!("method {method} uses no reference model: remove {key}"),
                    ));
                }
            }
        }
        if self.cpo_alpha.is_some() && !matches!(method, Method::Cpo | Method::Simpo) {
            return Err(bad(
                "cpo_alpha",
                format!("applies to method cpo and simpo, not {method}"),
            ));
        }
        if method == Method::Kto {
            if self.rpo_alpha.is_some() {
                return Err(bad("rpo_alpha", "is a DPO option, not one of method kto"));
            }
            // TRL's check: each example's KL completion is another example's of its batch.
            if self.per_device_train_batch_size < 2 && crate::loss::kto::uses_kl(&self.loss()) {
                return Err(bad(
                    "per_device_train_batch_size",
                    "method kto needs at least 2 examples per batch: each example's KL \
                     completion is its batch neighbour's (use gradient_accumulation_steps for \
                     a small memory footprint)",
                ));
            }
        }
        Ok(())
    }

    /// TR-DPO's options: α in [0, 1], at least one step between syncs, and a reference that runs
    /// beside the policy (a precomputed one cannot follow it).
    fn validate_reference_sync(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.ref_model_mixup_alpha) {
            return Err(bad("ref_model_mixup_alpha", "must be in [0, 1]"));
        }
        if self.ref_model_sync_steps == 0 {
            return Err(bad("ref_model_sync_steps", "must be at least 1"));
        }
        if self.sync_ref_model && self.precompute_ref_log_probs {
            return Err(bad(
                "sync_ref_model",
                "the reference changes during training, so its log-probs cannot be precomputed: \
                 set precompute_ref_log_probs to false",
            ));
        }
        Ok(())
    }

    /// `load_best_model_at_end` and `save_strategy = "best"` need evaluations, and checkpoints
    /// written where they happen (transformers' rules).
    fn validate_best_model(&self) -> Result<(), ConfigError> {
        let eval = self.eval_strategy();
        if self.lr_scheduler_type == LrSchedulerType::ReduceLrOnPlateau
            && eval == IntervalStrategy::No
        {
            return Err(bad(
                "lr_scheduler_type",
                "reduce_lr_on_plateau needs evaluations: set eval_strategy to `steps` or `epoch`",
            ));
        }
        if self.save_strategy == SaveStrategy::Best && eval == IntervalStrategy::No {
            return Err(bad(
                "save_strategy",
                "`best` needs evaluations: set eval_strategy to `steps` or `epoch`",
            ));
        }
        if !self.load_best_model_at_end || self.save_strategy == SaveStrategy::Best {
            return Ok(());
        }
        let save = match self.save_strategy {
            SaveStrategy::No => IntervalStrategy::No,
            SaveStrategy::Steps => IntervalStrategy::Steps,
            SaveStrategy::Epoch => IntervalStrategy::Epoch,
            SaveStrategy::Best => unreachable!("returned above"),
        };
        if eval == IntervalStrategy::No || save != eval {
            return Err(bad(
                "load_best_model_at_end",
                format!(
                    "needs save_strategy and eval_strategy to match and not be `no` (save_strategy {save:?}, eval_strategy {eval:?}), or save_strategy `best`"
                ),
            ));
        }
        let every = self.eval_every();
        if save == IntervalStrategy::Steps && (every == 0 || !self.save_steps.is_multiple_of(every))
        {
            return Err(bad(
                "load_best_model_at_end",
                format!(
                    "save_steps ({}) must be a multiple of eval_steps ({every}) so the best evaluation has a checkpoint",
                    self.save_steps
                ),
            ));
        }
        Ok(())
    }

    /// When to evaluate: `eval_strategy`, or `steps` when unset.
    pub fn eval_strategy(&self) -> IntervalStrategy {
        self.eval_strategy.unwrap_or(IntervalStrategy::Steps)
    }

    /// The eval metric that ranks checkpoints and early stopping watches: `metric_for_best_model`
    /// with `eval_` put in front when missing, as transformers does (`loss` → `eval_loss`).
    pub fn best_metric(&self) -> String {
        let m = &self.metric_for_best_model;
        if m.starts_with("eval_") {
            m.clone()
        } else {
            format!("eval_{m}")
        }
    }

    /// Whether checkpoints are ranked by `metric_for_best_model`.
    pub fn tracks_best_model(&self) -> bool {
        self.load_best_model_at_end || self.save_strategy == SaveStrategy::Best
    }

    /// Whether the run needs held-out pairs: to rank checkpoints or to drive the schedule.
    pub fn needs_eval_pairs(&self) -> bool {
        self.tracks_best_model() || self.lr_scheduler_type == LrSchedulerType::ReduceLrOnPlateau
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `rpo_alpha` is TRL 0.x's RPO: the loss plus alpha × the chosen NLL, which TRL 1.x writes as
    /// `loss_type = ["sigmoid", "sft"]` with `loss_weights = [1, alpha]`.
    #[test]
    fn rpo_alpha_is_sft_weighted_by_alpha() {
        let rpo = TrainConfig {
            rpo_alpha: Some(0.4),
            ..Default::default()
        };
        let spelled = TrainConfig {
            loss_type: vec![LossType::Sigmoid, LossType::Sft],
            loss_weights: Some(vec![1.0, 0.4]),
            ..Default::default()
        };
        assert_eq!(rpo.loss(), spelled.loss());
        rpo.validate().unwrap();
        let both = TrainConfig {
            loss_type: vec![LossType::Sft],
            ..rpo.clone()
        };
        assert_eq!(both.validate().unwrap_err().key, "rpo_alpha");
        let negative = TrainConfig {
            rpo_alpha: Some(-1.0),
            ..rpo
        };
        assert_eq!(negative.validate().unwrap_err().key, "rpo_alpha");
    }
}
