//! Every key a TRL user may bring — TRL 1.16's `DPOConfig` with the `TrainingArguments` it inherits,
//! `ModelConfig`, `ScriptArguments` and the dataset-mixture keys that `trl dpo --config` reads — and
//! prefer's answer to each: the key itself (TRL's meaning), prefer's name for it, accepted with one
//! warning line because it changes nothing here, or refused, naming what prefer offers instead.
//!
//! A key left at TRL's default says nothing: a `DPOConfig.to_dict()` dump holds all 139 keys, and
//! only those set to something else need an answer. `tests/fixtures/trl_keys.json` (generated from
//! TRL by `tools/make_trl_keys.py`) holds the key list the tests walk, so no key is forgotten.

use serde_json::{Map, Value};

/// prefer's answer to one TRL key.
#[derive(Debug, Clone, Copy)]
pub enum Answer {
    /// A prefer key of the same name and TRL's meaning.
    Same,
    /// TRL's name for the prefer key given.
    Alias(&'static str),
    /// Changes nothing here: another value than TRL's default gets one warning line saying why.
    Inert(&'static str),
    /// Another value than TRL's default is refused; the text says what prefer offers instead.
    Refused(&'static str),
    /// The value decides (a function of it).
    Check(fn(&Value) -> Verdict),
}

/// What happens to one key's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Nothing to say: the value changes nothing.
    Quiet,
    /// The value goes to this prefer key.
    Set(&'static str, Value),
    /// Accepted with a warning line giving this reason.
    Warn(String),
    /// Refused with this reason.
    Refuse(String),
}

/// One key of TRL's, its default there (as JSON text) and prefer's answer.
#[derive(Debug, Clone, Copy)]
pub struct TrlKey {
    /// The key as TRL spells it.
    pub name: &'static str,
    /// TRL 1.16's declared default, as JSON.
    pub default: &'static str,
    /// What prefer does with it.
    pub answer: Answer,
}

const fn key(name: &'static str, default: &'static str, answer: Answer) -> TrlKey {
    TrlKey {
        name,
        default,
        answer,
    }
}

use Answer::{Alias, Check, Inert, Refused, Same};

const HUB: &str =
    "prefer does not upload; the adapter directory is in PEFT's format for `hf upload`";
const ONE_DEVICE: &str = "prefer trains on one device (data parallelism is a later issue)";
const LOADER: &str = "prefer reads the data files directly, without a data loader";
const LOGGING: &str = "prefer writes metrics.jsonl, metrics.csv and plots into output_dir";
const FULL_EVAL: &str =
    "evaluation computes in the training's type (`bf16`, `fp16` or `bnb_4bit_compute_dtype`)";
const CHECKPOINTING: &str = "prefer's gradient_checkpointing recomputes each decoder layer in a backward pass of its own; torch's checkpoint options (use_reentrant, ...) have no counterpart";

/// TRL 1.16's keys, in the order `trl dpo --config` reads them, then older names.
#[rustfmt::skip]
pub const TRL_KEYS: &[TrlKey] = &[
    // --- ScriptArguments ---
    key("dataset_name", "null", Alias("data")),
    key("dataset_config", "null", Same),
    key("dataset_train_split", "\"train\"", Same),
    key("dataset_test_split", "\"test\"", Same),
    key("dataset_streaming", "false", Inert(LOADER)),
    key("ignore_bias_buffers", "false", Inert(ONE_DEVICE)),
    // --- TrainingArguments, as DPOConfig sets them ---
    key("output_dir", "null", Same),
    key("per_device_train_batch_size", "8", Same),
    key("num_train_epochs", "3.0", Same),
    key("max_steps", "-1", Same),
    key("learning_rate", "1e-06", Same),
    key("lr_scheduler_type", "\"linear\"", Same),
    key("lr_scheduler_kwargs", "null", Same),
    key("warmup_steps", "0", Check(warmup_steps)),
    key("optim", "\"adamw_torch_fused\"", Check(optim)),
    key("optim_args", "null", Refused("prefer's AdamW takes adam_beta1, adam_beta2, adam_epsilon and weight_decay")),
    key("weight_decay", "0.0", Same),
    key("adam_beta1", "0.9", Same),
    key("adam_beta2", "0.999", Same),
    key("adam_epsilon", "1e-08", Same),
    key("optim_target_modules", "null", Refused("prefer's optimiser is AdamW over the LoRA factors")),
    key("gradient_accumulation_steps", "1", Same),
    key("average_tokens_across_devices", "true", Inert(ONE_DEVICE)),
    key("max_grad_norm", "1.0", Same),
    key("label_smoothing_factor", "0.0", Refused("DPO's label smoothing is `label_smoothing`")),
    key("bf16", "null", Same),
    key("fp16", "false", Same),
    key("bf16_full_eval", "false", Inert(FULL_EVAL)),
    key("fp16_full_eval", "false", Inert(FULL_EVAL)),
    key("tf32", "null", Inert("no effect on the CPU; on CUDA, CubeCL runs f32 matmuls as TF32")),
    key("activation_checkpointing", "null", Alias("gradient_checkpointing")),
    key("activation_checkpointing_kwargs", "null", Inert(CHECKPOINTING)),
    key("gradient_checkpointing", "true", Same),
    key("gradient_checkpointing_kwargs", "null", Inert(CHECKPOINTING)),
    key("torch_compile", "false", Inert("prefer's kernels are compiled ahead of time")),
    key("torch_compile_backend", "null", Inert("prefer's kernels are compiled ahead of time")),
    key("torch_compile_mode", "null", Inert("prefer's kernels are compiled ahead of time")),
    key("use_liger_kernel", "false", Inert("prefer's fused kernels are always on")),
    key("liger_kernel_config", "null", Inert("prefer's fused kernels are always on")),
    key("use_cache", "false", Inert("the KV cache serves decoding; training never uses it")),
    key("neftune_noise_alpha", "null", Refused("NEFTune's embedding noise is not implemented")),
    key("torch_empty_cache_steps", "null", Inert("prefer frees device memory as tensors drop")),
    key("auto_find_batch_size", "false", Refused("set per_device_train_batch_size and gradient_accumulation_steps")),
    key("logging_strategy", "\"steps\"", Same),
    key("logging_steps", "10", Same),
    key("logging_first_step", "false", Same),
    key("log_on_each_node", "true", Inert(ONE_DEVICE)),
    key("logging_nan_inf_filter", "true", Inert("a non-finite loss stops the run, naming the step and the last checkpoint")),
    key("include_num_input_tokens_seen", "\"no\"", Inert("every training row logs `tokens`, `tokens_computed` and `tokens_per_second`")),
    key("log_level", "\"passive\"", Inert(LOGGING)),
    key("log_level_replica", "\"warning\"", Inert(ONE_DEVICE)),
    key("disable_tqdm", "null", Check(disable_tqdm)),
    key("report_to", "\"none\"", Check(report_to)),
    key("run_name", "null", Inert(LOGGING)),
    key("project", "\"huggingface\"", Inert(LOGGING)),
    key("trackio_space_id", "null", Inert(LOGGING)),
    key("trackio_bucket_id", "null", Inert(LOGGING)),
    key("trackio_static_space_id", "null", Inert(LOGGING)),
    key("eval_strategy", "\"no\"", Same),
    key("eval_steps", "null", Same),
    key("eval_delay", "0", Refused("evaluations start at the first due step; use eval_steps")),
    key("per_device_eval_batch_size", "8", Same),
    key("prediction_loss_only", "false", Inert("evaluation logs the loss and the preference metrics")),
    key("eval_on_start", "false", Same),
    key("eval_do_concat_batches", "true", Inert("evaluation keeps per-pair values, not predictions")),
    key("eval_use_gather_object", "false", Inert(ONE_DEVICE)),
    key("eval_accumulation_steps", "null", Inert("evaluation keeps per-pair values, not predictions")),
    key("include_for_metrics", "[]", Inert("evaluation logs the loss and the preference metrics")),
    key("batch_eval_metrics", "false", Inert("evaluation logs the loss and the preference metrics")),
    key("save_only_model", "false", Inert("checkpoints always hold the optimiser and trainer state, so they resume")),
    key("save_strategy", "\"steps\"", Same),
    key("save_steps", "500", Same),
    key("save_on_each_node", "false", Inert(ONE_DEVICE)),
    key("save_total_limit", "null", Same),
    key("enable_jit_checkpoint", "false", Inert("checkpoints are written atomically at save steps; resume with `prefer train --resume`")),
    key("push_to_hub", "false", Refused(HUB)),
    key("hub_token", "null", Check(hub_token)),
    key("hub_private_repo", "null", Inert(HUB)),
    key("hub_model_id", "null", Inert(HUB)),
    key("hub_strategy", "\"every_save\"", Inert(HUB)),
    key("hub_always_push", "false", Inert(HUB)),
    key("hub_revision", "null", Inert(HUB)),
    key("load_best_model_at_end", "false", Same),
    key("metric_for_best_model", "null", Same),
    key("greater_is_better", "null", Same),
    key("ignore_data_skip", "false", Refused("a resumed run always continues the data order where it stopped")),
    key("restore_callback_states_from_checkpoint", "false", Inert("early-stopping progress is always restored with a checkpoint")),
    key("full_determinism", "false", Inert("a run on the CPU backends is deterministic for its seed")),
    key("seed", "42", Same),
    key("data_seed", "null", Refused("the data order follows `seed`")),
    key("use_cpu", "false", Refused("choose the device with `backend` (flex or ndarray run on the CPU)")),
    key("accelerator_config", "null", Inert(ONE_DEVICE)),
    key("parallelism_config", "null", Refused(ONE_DEVICE)),
    key("dataloader_drop_last", "false", Refused("the last, smaller micro-batch of an epoch is always used")),
    key("dataloader_num_workers", "0", Inert(LOADER)),
    key("dataloader_pin_memory", "true", Inert(LOADER)),
    key("dataloader_persistent_workers", "false", Inert(LOADER)),
    key("dataloader_prefetch_factor", "null", Inert(LOADER)),
    key("dataloader_multiprocessing_context", "null", Inert(LOADER)),
    key("dataloader_in_order", "true", Inert(LOADER)),
    key("remove_unused_columns", "true", Inert(LOADER)),
    key("label_names", "null", Inert("DPO's inputs are the prompt, chosen and rejected completions")),
    key("train_sampling_strategy", "\"random\"", Refused("pairs are shuffled each epoch from `seed`")),
    key("length_column_name", "\"length\"", Inert(LOADER)),
    key("ddp_find_unused_parameters", "null", Inert(ONE_DEVICE)),
    key("ddp_bucket_cap_mb", "null", Inert(ONE_DEVICE)),
    key("ddp_broadcast_buffers", "null", Inert(ONE_DEVICE)),
    key("ddp_static_graph", "null", Inert(ONE_DEVICE)),
    key("ddp_backend", "null", Inert(ONE_DEVICE)),
    key("ddp_timeout", "1800", Inert(ONE_DEVICE)),
    key("fsdp", "null", Refused(ONE_DEVICE)),
    key("fsdp_config", "null", Refused(ONE_DEVICE)),
    key("deepspeed", "null", Refused(ONE_DEVICE)),
    key("debug", "\"\"", Check(debug)),
    key("skip_memory_metrics", "true", Inert("peak memory is measured by the benchmarks, not logged")),
    key("do_train", "false", Inert("`prefer train` trains, and evaluates when there are held-out pairs")),
    key("do_eval", "false", Inert("`prefer train` trains, and evaluates when there are held-out pairs")),
    key("do_predict", "false", Inert("`prefer train` trains, and evaluates when there are held-out pairs")),
    key("resume_from_checkpoint", "null", Refused("resume with `prefer train --resume [DIR]`")),
    key("local_rank", "-1", Inert(ONE_DEVICE)),
    // --- DPOConfig's own ---
    key("model_init_kwargs", "null", Refused("the base loads as stored; set load_in_4bit and bnb_4bit_* for quantisation")),
    key("trust_remote_code", "false", Inert("prefer runs no Python: Llama-family architectures only")),
    key("router_aux_loss_coef", "null", Inert("for mixture-of-experts models; prefer loads dense Llama-family models")),
    key("disable_dropout", "true", Same),
    key("dataset_num_proc", "null", Inert(LOADER)),
    key("max_length", "1024", Same),
    key("truncation_mode", "\"keep_start\"", Same),
    key("padding_free", "false", Same),
    key("pad_to_multiple_of", "\"auto\"", Inert("padding aligns nothing here; padding-free batches compute no padding at all")),
    key("precompute_ref_log_probs", "false", Same),
    key("precompute_ref_batch_size", "null", Inert("the reference is precomputed per_device_eval_batch_size pairs at a time: the same values")),
    key("loss_type", "[\"sigmoid\"]", Same),
    key("loss_weights", "null", Same),
    key("ld_alpha", "null", Same),
    key("f_divergence_type", "\"reverse_kl\"", Same),
    key("f_alpha_divergence_coef", "0.5", Same),
    key("label_smoothing", "0.0", Same),
    key("beta", "0.1", Same),
    key("use_weighting", "false", Same),
    key("discopop_tau", "0.05", Same),
    key("activation_offloading", "false", Inert("activations stay in device memory: the same numbers, more memory")),
    key("sync_ref_model", "false", Same),
    key("ref_model_mixup_alpha", "0.6", Same),
    key("ref_model_sync_steps", "512", Same),
    key("pad_token", "null", Check(pad_token)),
    // --- ModelConfig ---
    key("model_name_or_path", "null", Alias("model")),
    key("model_revision", "\"main\"", Same),
    key("dtype", "\"float32\"", Check(dtype)),
    key("attn_implementation", "null", Inert("prefer has one attention implementation (fused on the CPU)")),
    key("use_peft", "false", Check(use_peft)),
    key("lora_r", "16", Alias("r")),
    key("lora_alpha", "32", Same),
    key("lora_dropout", "0.05", Same),
    key("lora_target_modules", "null", Alias("target_modules")),
    key("lora_target_parameters", "null", Refused("adapters go on linear projections: use lora_target_modules")),
    key("lora_modules_to_save", "null", Refused("prefer trains the LoRA factors only")),
    key("lora_task_type", "\"CAUSAL_LM\"", Refused("prefer trains causal language models (CAUSAL_LM)")),
    key("use_rslora", "false", Same),
    key("use_dora", "false", Same),
    key("load_in_8bit", "false", Refused("the base is NF4 (load_in_4bit) or full precision; LLM.int8 is not implemented")),
    key("load_in_4bit", "false", Same),
    key("bnb_4bit_quant_type", "\"nf4\"", Same),
    key("use_bnb_nested_quant", "false", Alias("bnb_4bit_use_double_quant")),
    key("bnb_4bit_quant_storage", "null", Inert("NF4 codes are stored as packed bytes, two to a byte")),
    // --- DatasetMixtureConfig ---
    key("datasets", "[]", Refused("one training file: `data` (and `eval_data`)")),
    key("streaming", "false", Inert(LOADER)),
    key("test_split_size", "null", Alias("eval_ratio")),
    // --- older TRL / transformers names still found in recipes ---
    key("evaluation_strategy", "\"no\"", Alias("eval_strategy")),
    key("torch_dtype", "\"float32\"", Check(dtype)),
    key("warmup_ratio", "0.0", Same),
    key("max_prompt_length", "null", Same),
    key("max_completion_length", "null", Same),
    key("rpo_alpha", "null", Same),
];

/// TRL's booleans whose default is unset (`bool | None`): they are flags too (`--bf16`).
pub const UNSET_BOOLS: [&str; 9] = [
    "bf16",
    "tf32",
    "activation_checkpointing",
    "disable_tqdm",
    "hub_private_repo",
    "greater_is_better",
    "ddp_find_unused_parameters",
    "ddp_broadcast_buffers",
    "ddp_static_graph",
];

/// The prefer key that TRL's `name` sets (itself unless it is an alias).
pub fn prefer_name(name: &str) -> &str {
    match trl_key(name).map(|k| k.answer) {
        Some(Alias(to)) => to,
        _ => name,
    }
}

/// The row of `name`, if TRL has such a key.
pub fn trl_key(name: &str) -> Option<&'static TrlKey> {
    TRL_KEYS.iter().find(|k| k.name == name)
}

impl TrlKey {
    /// TRL's default as a JSON value.
    pub fn default_value(&self) -> Value {
        serde_json::from_str(self.default).unwrap_or(Value::Null)
    }

    /// What prefer does with `value` under this key.
    pub fn verdict(&self, value: &Value) -> Verdict {
        let at_default = value.is_null() || same_value(value, &self.default_value());
        match self.answer {
            Same => Verdict::Set(self.name, value.clone()),
            Alias(to) => Verdict::Set(to, value.clone()),
            Inert(_) | Refused(_) if at_default => Verdict::Quiet,
            Inert(why) => Verdict::Warn(why.into()),
            Refused(offer) => Verdict::Refuse(offer.to_string()),
            Check(f) => f(value),
        }
    }
}

/// Equal as config values: numbers by value (`3` and `3.0`), the rest as JSON.
fn same_value(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// transformers 5 folds `warmup_ratio` into `warmup_steps`: below 1 it is a fraction of the steps.
fn warmup_steps(v: &Value) -> Verdict {
    match v.as_f64() {
        Some(x) if x > 0.0 && x < 1.0 => Verdict::Set("warmup_ratio", v.clone()),
        Some(x) if x >= 1.0 && x.fract() == 0.0 => Verdict::Set("warmup_steps", (x as u64).into()),
        _ => Verdict::Set("warmup_steps", v.clone()),
    }
}

/// AdamW in 32 bits is what prefer runs, whichever implementation TRL would pick; AdamW with 8-bit
/// state is accepted with a warning; other optimisers are refused.
fn optim(v: &Value) -> Verdict {
    const EXACT: [&str; 8] = [
        "adamw_torch",
        "adamw_torch_fused",
        "adamw_torch_xla",
        "adamw_torch_npu_fused",
        "adamw_apex_fused",
        "adamw_hf",
        "paged_adamw_32bit",
        "adamw_anyprecision",
    ];
    const EIGHT_BIT: [&str; 4] = [
        "adamw_8bit",
        "adamw_bnb_8bit",
        "paged_adamw_8bit",
        "adamw_torch_4bit",
    ];
    match v.as_str() {
        None if v.is_null() => Verdict::Quiet,
        Some(name) if EXACT.contains(&name) => Verdict::Quiet,
        Some(name) if EIGHT_BIT.contains(&name) => Verdict::Warn(format!(
            "AdamW keeps its state in f32 here (exact AdamW, more memory than {name})"
        )),
        _ => Verdict::Refuse(format!(
            "{v}: prefer's optimiser is AdamW (adamw_torch, adamw_torch_fused, paged_adamw_32bit, adamw_8bit, ...)"
        )),
    }
}

/// `to_dict()` writes every `*_token` key as a placeholder (`<PAD_TOKEN>`), whatever it was.
fn masked(v: &Value, placeholder: &str) -> bool {
    v.is_null() || v.as_str() == Some(placeholder)
}

fn hub_token(v: &Value) -> Verdict {
    if masked(v, "<HUB_TOKEN>") {
        Verdict::Quiet
    } else {
        Verdict::Warn(HUB.into())
    }
}

fn pad_token(v: &Value) -> Verdict {
    if masked(v, "<PAD_TOKEN>") {
        Verdict::Quiet
    } else {
        Verdict::Refuse(
            "prefer pads with the tokenizer's pad token (or its end-of-sequence token); padding never reaches the loss".into(),
        )
    }
}

fn disable_tqdm(v: &Value) -> Verdict {
    match v.as_bool() {
        Some(true) => Verdict::Warn("the progress bar shows only on a terminal".into()),
        _ => Verdict::Quiet,
    }
}

/// `none` (or nothing) is quiet; a tracker is a warning, since prefer logs to files.
fn report_to(v: &Value) -> Verdict {
    let none = match v {
        Value::Null => true,
        Value::String(s) => s == "none",
        Value::Array(a) => a.is_empty() || a.iter().all(|x| x == "none"),
        _ => false,
    };
    if none {
        Verdict::Quiet
    } else {
        Verdict::Warn(LOGGING.into())
    }
}

fn debug(v: &Value) -> Verdict {
    let empty = match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    };
    if empty {
        Verdict::Quiet
    } else {
        Verdict::Warn("torch's debug options have no counterpart here".into())
    }
}

/// The model's load dtype: f32 is what prefer computes in; `auto` loads in f32 with a warning.
fn dtype(v: &Value) -> Verdict {
    match v.as_str() {
        None if v.is_null() => Verdict::Quiet,
        Some("float32" | "fp32" | "torch.float32") => Verdict::Quiet,
        Some("auto") => {
            Verdict::Warn("the weights are loaded as float32 whatever the checkpoint stores".into())
        }
        Some(
            "bfloat16" | "bf16" | "torch.bfloat16" | "float16" | "fp16" | "half" | "torch.float16",
        ) => Verdict::Warn(
            "the weights are loaded as float32 (or NF4); the compute type is `bf16`, `fp16` or \
             `bnb_4bit_compute_dtype`"
                .into(),
        ),
        _ => Verdict::Refuse(format!(
            "{v}: prefer loads weights as float32 and computes in float32, bfloat16 or float16"
        )),
    }
}

/// prefer trains LoRA adapters: `use_peft = false` asks for full fine-tuning.
fn use_peft(v: &Value) -> Verdict {
    match v.as_bool() {
        Some(true) => Verdict::Quiet,
        _ => Verdict::Refuse(
            "full fine-tuning is not offered: prefer trains LoRA adapters (set use_peft: true)"
                .into(),
        ),
    }
}

/// Where a table of keys came from, which decides the defaults of the keys it leaves out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// prefer's own TOML or flags: prefer's defaults.
    Prefer,
    /// A TRL recipe (YAML, or any table that sets `use_peft`): what it leaves out of the LoRA and
    /// quantisation keys takes `ModelConfig`'s defaults, as `trl dpo` would.
    TrlRecipe,
}

/// TRL's defaults where they differ from prefer's, for a recipe that leaves them out: `ModelConfig`'s
/// (PEFT's `LoraConfig` and a 4-bit base), no evaluation unless asked for, and the whole train
/// split trained on (`trl dpo` evaluates only the test split).
const RECIPE_DEFAULTS: [(&str, &str); 7] = [
    ("r", "16"),
    ("lora_alpha", "32"),
    ("lora_dropout", "0.05"),
    ("load_in_4bit", "false"),
    ("bnb_4bit_use_double_quant", "false"),
    ("eval_strategy", "\"no\""),
    ("eval_ratio", "0.0"),
];

/// A table in prefer's own keys, with the warning lines for keys that change nothing here.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Translated {
    /// prefer's keys and values.
    pub table: Map<String, Value>,
    /// One line per key accepted without effect.
    pub warnings: Vec<String>,
}

/// A key that cannot be taken, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("`{key}`: {message}")]
pub struct KeyError {
    /// The key as written.
    pub key: String,
    /// Why, and what to do instead.
    pub message: String,
}

/// Turns a table of prefer's and TRL's keys into prefer's: prefer's own keys pass, TRL's are
/// answered as their row says, and an unknown key is an error naming the nearest known one.
/// `prefer_keys` lists prefer's keys and which of them take null (unset) as a value.
pub fn translate(
    table: Map<String, Value>,
    source: Source,
    prefer_keys: &[(String, bool)],
) -> Result<Translated, KeyError> {
    let is_prefer = |k: &str| prefer_keys.iter().find(|(p, _)| p == k);
    let mut out = Translated::default();
    let mut given_as: Map<String, Value> = Map::new();
    for (name, value) in table {
        let (to, value) = match trl_key(&name).map(|row| row.verdict(&value)) {
            None if is_prefer(&name).is_some() => (name.clone(), value),
            None => {
                return Err(KeyError {
                    message: match nearest_key(&name, prefer_keys) {
                        Some(k) => format!("unknown key; did you mean `{k}`?"),
                        None => "unknown key".into(),
                    },
                    key: name,
                });
            }
            Some(Verdict::Quiet) => continue,
            Some(Verdict::Warn(reason)) => {
                out.warnings.push(format!(
                    "`{name} = {}`: {reason}; ignored",
                    one_line_json(&value)
                ));
                continue;
            }
            Some(Verdict::Refuse(message)) => return Err(KeyError { key: name, message }),
            Some(Verdict::Set(to, value)) => (to.to_string(), value),
        };
        // Null means "unset": kept for keys that take it, else the default applies (and it sets
        // nothing another name of the option could clash with).
        if value.is_null() && !is_prefer(&to).is_some_and(|(_, nullable)| *nullable) {
            continue;
        }
        if let Some(Value::String(first)) = given_as.get(&to) {
            // Two names of one option with one value (a transformers dump writes both of
            // `gradient_checkpointing` and `activation_checkpointing`) say the same thing.
            if out.table.get(&to) == Some(&value) {
                continue;
            }
            return Err(KeyError {
                key: name,
                message: format!("`{first}` sets the same option: give one of them"),
            });
        }
        given_as.insert(to.clone(), Value::String(name));
        out.table.insert(to, value);
    }
    if source == Source::TrlRecipe {
        for (k, v) in RECIPE_DEFAULTS {
            if !out.table.contains_key(k) {
                out.table
                    .insert(k.into(), serde_json::from_str(v).unwrap_or(Value::Null));
            }
        }
    }
    Ok(out)
}

/// A value as compact JSON, cut short when long.
fn one_line_json(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(60) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// The known key nearest to `key` (prefer's or TRL's), if one is near enough to be a typo of it.
pub fn nearest_key(key: &str, prefer_keys: &[(String, bool)]) -> Option<String> {
    let known = prefer_keys
        .iter()
        .map(|(k, _)| k.as_str())
        .chain(TRL_KEYS.iter().map(|k| k.name));
    let (distance, nearest) = known
        .map(|k| (edit_distance(key, k), k))
        .min_by_key(|(d, _)| *d)?;
    (distance <= key.len().max(3) / 2).then(|| nearest.to_string())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}
