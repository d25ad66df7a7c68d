//! `prefer train`: a TOML config under TRL's names, any key overridable as `--key value`, progress on
//! the terminal, and an output directory with the adapter, checkpoints, metrics, plots and a summary.
//! With no arguments it runs the built-in job (see `assets/default/train.toml`).

use std::{
    io::IsTerminal,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use prefer::{
    ConfigFile, Loaded, RunConfig,
    config_file::one_line,
    dpo::train::{LogRecord, Resume, Throughput, TrainObserver},
    training::{TrainingOutcome, train_from_config},
    trl_keys::{Source, TRL_KEYS, UNSET_BOOLS, nearest_key, prefer_name},
};

pub const EXAMPLES: &str =
    "Every config key is also a flag (`--learning-rate 5e-5` or `--learning_rate=5e-5`); flags
override the file. Keys use TRL's DPOConfig, PEFT's LoraConfig and BitsAndBytesConfig names.

Examples:
  prefer train                                   # the built-in job: NF4 + LoRA DPO on the CPU
  prefer train --config dpo.toml
  prefer train --model HuggingFaceTB/SmolLM2-135M-Instruct --data pairs.jsonl --output runs/smol \\
               --beta 0.1 --learning-rate 5e-5 --r 16 --lora-alpha 32 --target-modules all-linear
  prefer train --config dpo.toml --resume        # continue from the latest checkpoint
  prefer train --config dpo.toml --devices cuda:0,cuda:1    # data parallel, one replica per GPU
  prefer train --config dpo.toml --num-machines 2 --machine-rank 1 --main-process-ip 10.0.0.1
  prefer train --config dpo.toml --print-config  # show the effective config and exit";

/// Flags with their own meaning; every other `--key` is a config key.
pub const OWN_FLAGS: [&str; 9] = [
    "config",
    "model",
    "data",
    "eval-data",
    "output",
    "backend",
    "resume",
    "print-config",
    "help",
];

#[derive(Args, Debug, Clone, Default)]
pub struct TrainArgs {
    /// A config file of keys (TRL/PEFT/bitsandbytes names): prefer's TOML, a TRL recipe (YAML) or a
    /// `DPOConfig.to_dict()` dump (JSON).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The base model: a Hugging Face directory or a .gguf file (`model`).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training pairs (`data`): TRL standard/conversational/implicit or ShareGPT rows in a JSON
    /// Lines, JSON or Parquet file, a dataset folder, or a Hub dataset id in the local cache.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out pairs (`eval_data`); without them `eval_ratio` of the data is held out.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Output directory (`output_dir`).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// ndarray, flex, wgpu or cuda (`backend`).
    #[arg(long)]
    pub backend: Option<String>,
    /// Continue from the latest checkpoint in the output directory, or from DIR.
    #[arg(long, num_args = 0..=1, value_name = "DIR")]
    pub resume: Option<Option<PathBuf>>,
    /// Print the effective config as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// `--key value` pairs taken out of the command line before parsing.
    #[arg(skip)]
    pub overrides: Vec<(String, String)>,
}

/// Takes `--key value` / `--key=value` config overrides out of `prefer train`'s arguments, leaving
/// the rest for clap. An unknown `--key` is an error that names the nearest valid key.
/// Config keys set on the command line, with their text.
pub type Overrides = Vec<(String, String)>;

pub fn split_overrides(args: Vec<String>) -> Result<(Vec<String>, Overrides)> {
    let keys = known_keys();
    let bools = bool_keys();
    let mut rest = Vec::new();
    let mut overrides = Vec::new();
    let mut it = args.into_iter().peekable();
    while let Some(arg) = it.next() {
        let Some(flag) = arg.strip_prefix("--") else {
            rest.push(arg);
            continue;
        };
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (flag.to_string(), None),
        };
        if OWN_FLAGS.contains(&name.as_str()) {
            rest.push(arg);
            continue;
        }
        let key = name.replace('-', "_");
        if !keys.contains(&key) {
            match nearest_key(&key, &RunConfig::keys_and_nullability()) {
                Some(k) => bail!(
                    "unknown option `--{name}`; did you mean `--{}`?",
                    k.replace('_', "-")
                ),
                None => bail!("unknown option `--{name}`"),
            }
        }
        let value = match inline {
            Some(v) => v,
            None if bools.contains(&key) && it.peek().is_none_or(|n| n.starts_with("--")) => {
                "true".into()
            }
            None => it
                .next()
                .with_context(|| format!("`--{name}` needs a value"))?,
        };
        overrides.push((key, value));
    }
    Ok((rest, overrides))
}

/// prefer's keys and TRL's: all are flags.
fn known_keys() -> Vec<String> {
    let mut keys = RunConfig::keys();
    keys.extend(TRL_KEYS.iter().map(|k| k.name.to_string()));
    keys
}

/// Keys that take a boolean, so that `--key` alone means `true`.
fn bool_keys() -> Vec<String> {
    let mut keys: Vec<String> = match serde_json::to_value(RunConfig::default()) {
        Ok(serde_json::Value::Object(m)) => m
            .into_iter()
            .filter(|(_, v)| v.is_boolean())
            .map(|(k, _)| k)
            .collect(),
        _ => Vec::new(),
    };
    keys.extend(
        TRL_KEYS
            .iter()
            .filter(|k| k.default_value().is_boolean() || UNSET_BOOLS.contains(&k.name))
            .map(|k| k.name.to_string()),
    );
    keys
}

/// A flag's text as a value: numbers, booleans and arrays as TOML reads them, anything else as a
/// string.
fn flag_value(text: &str) -> serde_json::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .and_then(|v| serde_json::to_value(v).ok())
        .unwrap_or_else(|| serde_json::Value::String(text.to_string()))
}

/// The built-in job's files, compiled into the binary.
mod builtin {
    pub const CONFIG: &str = include_str!("../assets/default/train.toml");
    pub const MODEL_CONFIG: &str = include_str!("../assets/default/config.json");
    pub const TOKENIZER: &str = include_str!("../assets/default/tokenizer.json");
    pub const TOKENIZER_CONFIG: &str = include_str!("../assets/default/tokenizer_config.json");
    pub const TRAIN: &str = include_str!("../assets/default/train.jsonl");
    pub const EVAL: &str = include_str!("../assets/default/eval.jsonl");
}

/// Whether the run is the built-in job: no config file and no model or data anywhere.
fn is_builtin(args: &TrainArgs) -> bool {
    args.config.is_none()
        && args.model.is_none()
        && args.data.is_none()
        && !args
            .overrides
            .iter()
            .any(|(k, _)| k == "model" || k == "data")
}

/// The effective config — defaults, then the file (or the built-in job's), then the flags — and
/// one warning line per key that changes nothing here.
pub fn effective_config(args: &TrainArgs) -> Result<Loaded> {
    let file = match &args.config {
        Some(path) => Some(ConfigFile::read(path)?),
        None => None,
    };
    let (mut table, source) = match &file {
        Some(f) => (f.table.clone(), f.source),
        None if is_builtin(args) => {
            let builtin: serde_json::Value = toml::from_str(builtin::CONFIG)?;
            match builtin {
                serde_json::Value::Object(m) => (m, Source::Prefer),
                _ => bail!("the built-in job's config is not a table"),
            }
        }
        None => (serde_json::Map::new(), Source::Prefer),
    };
    for (key, value) in &args.overrides {
        // A flag wins over the file whichever name (prefer's or TRL's) either uses.
        table.retain(|k, _| prefer_name(k) != prefer_name(key));
        table.insert(key.clone(), flag_value(value));
    }
    let paths = [
        ("model", &args.model),
        ("data", &args.data),
        ("eval_data", &args.eval_data),
        ("output_dir", &args.output),
    ];
    for (key, path) in paths {
        if let Some(p) = path {
            table.insert(key.into(), p.display().to_string().into());
        }
    }
    if let Some(b) = &args.backend {
        table.insert("backend".into(), b.clone().into());
    }
    RunConfig::from_table(table, source).map_err(|e| {
        let from_flags = args.overrides.iter().any(|(k, _)| *k == e.key)
            || matches!(
                e.key.as_str(),
                "model" | "data" | "eval_data" | "output_dir" | "backend"
            );
        match &file {
            Some(f) if !from_flags => {
                let line = f.line_of(&e.key).map_or(String::new(), |l| format!(":{l}"));
                anyhow::anyhow!("{}{line}: {}", f.path.display(), one_line(&e.to_string()))
            }
            _ => anyhow::anyhow!("command line: {}", one_line(&e.to_string())),
        }
    })
}

/// Writes the built-in model (random weights from a fixed seed) and data under `dir`.
fn write_builtin_task(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    use prefer::llama::{LlamaConfig, MemoryWeights, RawTensor, WeightSource};
    let model = dir.join("model");
    std::fs::create_dir_all(&model).with_context(|| format!("{}", model.display()))?;
    let json: serde_json::Value = serde_json::from_str(builtin::MODEL_CONFIG)?;
    let config = LlamaConfig::from_hf_json(&json, &model.join("config.json"))?;
    let mut weights = MemoryWeights::random(&config, 0.2, 2026);
    let mut tensors = Vec::new();
    for name in weights.names() {
        if let Some(t) = weights.take(&name)? {
            let bytes = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push((
                name,
                RawTensor {
                    dtype: "F32".into(),
                    shape: t.shape.clone(),
                    bytes,
                },
            ));
        }
    }
    // Every machine of a multi-machine run on one host writes the same files: each is written
    // whole beside its place and renamed into it, so none is read half-written.
    let pid = std::process::id();
    let weights_path = model.join("model.safetensors");
    let tmp = model.join(format!(".model.safetensors.{pid}"));
    prefer::quant::write_safetensors(&tmp, &tensors)?;
    std::fs::rename(&tmp, &weights_path).with_context(|| format!("{}", weights_path.display()))?;
    for (name, text) in [
        ("config.json", builtin::MODEL_CONFIG),
        ("tokenizer.json", builtin::TOKENIZER),
        ("tokenizer_config.json", builtin::TOKENIZER_CONFIG),
        ("train.jsonl", builtin::TRAIN),
        ("eval.jsonl", builtin::EVAL),
    ] {
        let path = if name.ends_with(".jsonl") {
            dir.join(name)
        } else {
            model.join(name)
        };
        let tmp = path.with_extension(format!("tmp{pid}"));
        std::fs::write(&tmp, text).with_context(|| format!("{}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("{}", path.display()))?;
    }
    Ok((model, dir.join("train.jsonl"), dir.join("eval.jsonl")))
}

/// Progress: a bar with ETA on a terminal, plain lines otherwise (CI logs).
struct Console {
    bar: Option<ProgressBar>,
}

impl Console {
    fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }
}

fn metric_line(r: &LogRecord) -> String {
    let names: &[&str] = if r.is_eval() {
        &[
            "eval_loss",
            "eval_rewards/accuracies",
            "eval_rewards/margins",
            "eval_rewards/chosen",
            "eval_rewards/rejected",
        ]
    } else {
        &[
            "loss",
            "rewards/accuracies",
            "rewards/margins",
            "grad_norm",
            "learning_rate",
            "tokens_per_second",
            "tokens",
            "tokens_computed",
        ]
    };
    let cells: Vec<String> = names
        .iter()
        .filter_map(|n| r.get(n).map(|v| format!("{n} {}", short(v))))
        .collect();
    format!(
        "step {:>5}  epoch {:.2}  {}",
        r.step,
        r.epoch,
        cells.join("  ")
    )
}

fn short(v: f64) -> String {
    if v != 0.0 && (v.abs() < 1e-3 || v.abs() >= 1e5) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

impl TrainObserver for Console {
    fn on_start(&mut self, step: usize, total: usize) {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total as u64).with_position(step as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:40.cyan/blue} {pos}/{len} steps  {elapsed} elapsed, ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            self.bar = Some(bar);
        } else {
            eprintln!("training: steps {step}..{total}");
        }
    }
    fn on_step(&mut self, step: usize, _total: usize) {
        if let Some(bar) = &self.bar {
            bar.set_position(step as u64);
        }
    }
    fn on_log(&mut self, record: &LogRecord) {
        self.line(&metric_line(record));
    }
    fn on_message(&mut self, message: &str) {
        self.line(message);
    }
}

pub fn run(mut args: TrainArgs, overrides: Vec<(String, String)>) -> Result<()> {
    args.overrides = overrides;
    let builtin = is_builtin(&args);
    let Loaded {
        mut config,
        warnings,
    } = effective_config(&args)?;
    for line in &warnings {
        eprintln!("warning: {line}");
    }
    if args.print_config {
        print!("{}", toml::to_string(&config)?);
        return Ok(());
    }
    config.validate()?;
    if builtin {
        let task = config.train.output_dir.join("default-task");
        let (model, train, eval) = write_builtin_task(&task)?;
        eprintln!(
            "prefer train: the built-in job (a small random Llama, NF4 + LoRA, on the CPU); files in {}",
            task.display()
        );
        config.model = Some(model);
        config.data = Some(train);
        config.eval_data = Some(eval);
    }
    config.validate()?;
    // Machine 0 writes the run's files; the other machines of a multi-machine run only train.
    let writes = config.machine_rank == 0;
    let out = &config.train.output_dir;
    if writes {
        std::fs::create_dir_all(out).with_context(|| format!("{}", out.display()))?;
        let config_path = out.join("config.toml");
        std::fs::write(&config_path, toml::to_string(&config)?)
            .with_context(|| format!("{}", config_path.display()))?;
    }
    let resume = args.resume.map(|d| d.map_or(Resume::Latest, Resume::From));
    let mut console = Console { bar: None };
    let result = train_from_config(&config, resume, &mut console);
    if let Some(bar) = console.bar.take() {
        bar.finish_and_clear();
    }
    let outcome = result?;
    if !writes {
        println!(
            "machine {} of {}: {} steps done; machine 0 wrote the adapter, metrics and checkpoints",
            config.machine_rank, config.num_machines, outcome.summary.steps
        );
        return Ok(());
    }
    let out = &config.train.output_dir;
    let svg = out.join("training_curves.svg");
    crate::plot::training_curves(&svg, &outcome.summary.history)?;
    let summary = summary_markdown(&config, &outcome);
    std::fs::write(out.join("summary.md"), &summary)
        .with_context(|| format!("{}", out.join("summary.md").display()))?;
    println!("{}", summary_table(&config, &outcome));
    println!("adapter:  {}", outcome.summary.adapter_dir.display());
    println!("metrics:  {}", out.join("metrics.jsonl").display());
    println!("plots:    {}", svg.display());
    println!("summary:  {}", out.join("summary.md").display());
    Ok(())
}

const SUMMARY_METRICS: [&str; 6] = [
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "kl",
];

fn summary_rows(o: &TrainingOutcome) -> Vec<(String, String, String, String)> {
    let last_train = o.summary.history.iter().rev().find(|r| !r.is_eval());
    let eval = o.summary.final_eval.as_ref();
    let cell = |r: Option<&LogRecord>, k: &str| r.and_then(|r| r.get(k)).map_or("-".into(), short);
    SUMMARY_METRICS
        .iter()
        .map(|m| {
            let e = format!("eval_{m}");
            (
                m.to_string(),
                cell(last_train, m),
                cell(o.before.as_ref(), &e),
                cell(eval, &e),
            )
        })
        // A metric the method does not log (`kl` without a reference, accuracies under KTO).
        .filter(|(_, t, b, a)| [t, b, a].iter().any(|c| *c != "-"))
        .collect()
}

/// `s/step`, `tokens/s` and the share of computed tokens that were padding, over the steps this
/// run took.
fn speed(t: &Throughput) -> String {
    let padding = 1.0 - t.tokens as f64 / t.computed_tokens.max(1) as f64;
    format!(
        "{:.3} s/step, {:.0} tokens/s over {} steps; {:.1} % of computed tokens were padding",
        t.seconds_per_step(),
        t.tokens_per_second(),
        t.steps,
        100.0 * padding
    )
}

/// The backend, and the replicas when there are several: `flex`, `cuda × 2 devices × 2 machines`.
fn placement(run: &RunConfig, o: &TrainingOutcome) -> String {
    let mut s = o.backend.to_string();
    if run.devices.len() > 1 || run.num_machines > 1 {
        s += &format!(" × {} devices", run.devices.len());
    }
    if run.num_machines > 1 {
        s += &format!(" × {} machines", run.num_machines);
    }
    s
}

/// What the run trains on: preference pairs, or KTO's examples.
fn unit(run: &RunConfig) -> &'static str {
    if run.train.method.unpaired() {
        "examples"
    } else {
        "pairs"
    }
}

fn summary_table(run: &RunConfig, o: &TrainingOutcome) -> String {
    let mut s = format!(
        "\n{} steps in {:.1} s on {} ({}; {} training {}, {} held out{})\n\n{:<20} {:>12} {:>14} {:>14}\n",
        o.summary.steps,
        o.summary.seconds,
        placement(run, o),
        speed(&o.summary.throughput),
        o.pairs.0,
        unit(run),
        o.pairs.1,
        if o.summary.stopped_early {
            ", stopped early"
        } else {
            ""
        },
        "metric",
        "train (last)",
        "eval (before)",
        "eval (after)"
    );
    for (m, t, b, a) in summary_rows(o) {
        s += &format!("{m:<20} {t:>12} {b:>14} {a:>14}\n");
    }
    s
}

fn summary_markdown(run: &RunConfig, o: &TrainingOutcome) -> String {
    let config = &run.train;
    let mut s = String::from("# prefer train: summary\n\n");
    let show = |p: &Option<PathBuf>| p.as_ref().map_or("-".into(), |p| p.display().to_string());
    s += &format!(
        "- model: `{}`\n- data: `{}` ({} {}), eval: `{}` ({} {}), skipped rows: {}\n",
        show(&run.model),
        show(&run.data),
        o.pairs.0,
        unit(run),
        show(&run.eval_data),
        o.pairs.1,
        unit(run),
        o.skipped
    );
    s += &format!(
        "- loss: {} (beta {}), LoRA r {} alpha {} on {}, NF4 base: {}, compute: {}{}\n- {} optimiser steps in {:.1} s on {}{}\n- {}\n\n",
        match config.method {
            prefer::dpo::loss::Method::Dpo => config
                .loss_type
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join("+"),
            prefer::dpo::loss::Method::Kto => "kto".into(),
            m => format!("{m} (no reference)"),
        },
        config.beta,
        config.r,
        config.lora_alpha,
        config.target_modules.join(", "),
        config.load_in_4bit,
        config.compute_dtype().name(),
        if config.gradient_checkpointing {
            " with activation checkpointing"
        } else {
            ""
        },
        o.summary.steps,
        o.summary.seconds,
        placement(run, o),
        if o.summary.stopped_early {
            " (early stopping)"
        } else {
            ""
        },
        speed(&o.summary.throughput)
    );
    s += "| metric | train (last log) | eval before | eval after |\n|---|---:|---:|---:|\n";
    for (m, t, b, a) in summary_rows(o) {
        s += &format!("| {m} | {t} | {b} | {a} |\n");
    }
    s += "\nFiles: `adapter/` (PEFT), `checkpoint-N/`, `metrics.jsonl`, `metrics.csv`, `training_curves.svg`, `config.toml`.\n";
    s
}
