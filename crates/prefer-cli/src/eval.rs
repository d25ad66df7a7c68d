//! `prefer eval`: DPO loss and preference metrics of a policy adapter against a reference.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use prefer::{
    backend::{BackendJob, BackendKind, run_on},
    dpo::{
        EvalOptions, EvalReport, LossConfig, LossType, Packing,
        data::{
            DataFormat, OnBadRow, TokenizeOptions, TokenizedPair, TruncationMode,
            drop_truncated_away, kto_pairs, load_examples, load_file, tokenize_examples,
            tokenize_rows,
        },
        evaluate_pairs,
        loss::Method,
    },
    llama::{ChatTokenizer, Checkpoint, DenseFactory, LinearFactory, LinearLayer},
    lora::{LoraFactory, LoraLinear, load_peft, set_active_adapter},
    quant::Nf4Factory,
};

pub const EXAMPLES: &str = "Examples:
  prefer eval --model path/to/hf-model --adapter runs/dpo/adapter --data pairs.jsonl
  prefer eval --model model.gguf --adapter policy --ref-adapter sft --data dpo.json --loss-type sigmoid,sft --json
  prefer eval --model path/to/hf-model --adapter runs/orpo/adapter --data pairs.jsonl --method orpo
  prefer eval --model path/to/hf-model --adapter runs/kto/adapter --data unpaired.jsonl --method kto";

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// A Hugging Face directory (full precision or bitsandbytes 4-bit) or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// The policy's PEFT adapter; without it the policy is the base model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The reference's PEFT adapter; without it the reference is the base model (TRL's behaviour).
    #[arg(long)]
    pub ref_adapter: Option<PathBuf>,
    /// Preference pairs: JSON Lines or a JSON array (TRL standard/conversational/implicit, ShareGPT);
    /// under `--method kto` also unpaired examples (`{"prompt", "completion", "label"}`).
    #[arg(long)]
    pub data: PathBuf,
    /// Force the data format instead of detecting it: standard, conversational, implicit, sharegpt.
    #[arg(long)]
    pub format: Option<DataFormat>,
    /// The method whose loss and metrics to report: dpo or kto (against the reference), or the
    /// reference-free cpo, simpo, orpo.
    #[arg(long, default_value = "dpo")]
    pub method: Method,
    /// β (ORPO's λ).
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// CPO/SimPO: weight of the chosen completions' NLL (default 1 for cpo, 0 for simpo).
    #[arg(long)]
    pub cpo_alpha: Option<f64>,
    /// SimPO's target reward margin γ.
    #[arg(long, default_value_t = 0.5)]
    pub simpo_gamma: f64,
    /// KTO's weight of desirable examples.
    #[arg(long, default_value_t = 1.0)]
    pub desirable_weight: f64,
    /// KTO's weight of undesirable examples.
    #[arg(long, default_value_t = 1.0)]
    pub undesirable_weight: f64,
    /// Loss types, comma-separated (TRL's names).
    #[arg(long, default_value = "sigmoid", value_delimiter = ',')]
    pub loss_type: Vec<LossType>,
    /// Weights of the loss types, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub loss_weights: Option<Vec<f64>>,
    /// Label smoothing ε.
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// Longest prompt+completion sequence.
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
    /// Keep the last N prompt tokens.
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
    /// Keep the first N tokens of each completion.
    #[arg(long)]
    pub max_completion_length: Option<usize>,
    /// Pairs per batch (KTO: examples per batch, which also sets whose completions serve as
    /// each example's KL completion, as `per_device_train_batch_size` does in training).
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// `error` stops at the first bad row; `skip` skips and counts them.
    #[arg(long, default_value = "error", value_parser = parse_policy)]
    pub on_bad_row: OnBadRow,
    /// Pack each batch's sequences without padding (`true`/`false`; default: on for the CPU
    /// backends). The numbers are the same either way.
    #[arg(long)]
    pub padding_free: Option<bool>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Backend: ndarray, flex, wgpu or cuda (among those compiled in).
    #[arg(long, default_value = "flex", value_parser = crate::parse_backend)]
    pub backend: BackendKind,
}

fn parse_policy(s: &str) -> Result<OnBadRow, String> {
    match s {
        "error" => Ok(OnBadRow::Error),
        "skip" => Ok(OnBadRow::Skip),
        _ => Err(format!("`{s}` is not error or skip")),
    }
}

struct EvalJob(EvalArgs);

impl BackendJob for EvalJob {
    type Output = Result<EvalReport>;
    fn run<B: prefer::kernels::PreferBackend>(self, device: B::Device) -> Result<EvalReport> {
        let mut ckpt = Checkpoint::open(&self.0.model)?;
        if ckpt.is_bnb_4bit() {
            self.eval::<B, _>(&mut ckpt, Nf4Factory::default(), &device)
        } else {
            self.eval::<B, _>(&mut ckpt, DenseFactory, &device)
        }
    }
}

impl EvalJob {
    fn eval<B: prefer::kernels::PreferBackend, F: LinearFactory<B>>(
        &self,
        ckpt: &mut Checkpoint,
        inner: F,
        device: &B::Device,
    ) -> Result<EvalReport>
    where
        LoraLinear<B, F::Layer>: LinearLayer<B>,
    {
        let a = &self.0;
        let loss = LossConfig {
            beta: a.beta,
            loss_types: a.loss_type.clone(),
            loss_weights: a.loss_weights.clone(),
            label_smoothing: a.label_smoothing,
            method: a.method,
            cpo_alpha: a.cpo_alpha.unwrap_or_else(|| a.method.default_cpo_alpha()),
            simpo_gamma: a.simpo_gamma,
            desirable_weight: a.desirable_weight,
            undesirable_weight: a.undesirable_weight,
            ..Default::default()
        };
        loss.validate().map_err(anyhow::Error::msg)?;
        if !a.method.uses_reference() && a.ref_adapter.is_some() {
            bail!(
                "--method {} uses no reference: remove --ref-adapter",
                a.method
            );
        }
        let tok = ckpt
            .tokenizer
            .clone()
            .with_context(|| format!("{}: the model has no tokenizer", a.model.display()))?;

        // Data first: bad rows stop the run before any model work.
        let pairs = self.pairs(&tok)?;

        // One base; the policy and reference differ only in their active adapter.
        let factory = LoraFactory::without_adapters(inner);
        let mut policy = ckpt.build(&factory, device)?;
        if let Some(dir) = &a.ref_adapter {
            load_peft(&mut policy, dir, "reference")?;
        }
        if let Some(dir) = &a.adapter {
            load_peft(&mut policy, dir, "policy")?;
        }
        let mut reference = policy.clone();
        set_active_adapter(&mut reference, a.ref_adapter.as_ref().map(|_| "reference"));
        set_active_adapter(&mut policy, a.adapter.as_ref().map(|_| "policy"));
        let pad = ckpt
            .config
            .pad_token_id
            .or_else(|| tok.pad_token.as_deref().and_then(|t| tok.token_id(t)))
            .unwrap_or(0);
        let options = EvalOptions {
            loss,
            batch_size: a.batch_size.max(1),
            max_length: Some(a.max_length),
            truncation_mode: TruncationMode::KeepStart,
            packing: if a.padding_free.unwrap_or(a.backend.is_cpu()) {
                Packing::PaddingFree
            } else {
                Packing::Padded
            },
        };
        Ok(evaluate_pairs(&policy, &reference, &pairs, pad, &options)?)
    }

    /// The data as tokenised pairs (KTO: examples with their KL completions); bad rows stop here
    /// or are skipped and counted.
    fn pairs(&self, tok: &ChatTokenizer) -> Result<Vec<TokenizedPair>> {
        let a = &self.0;
        let opts = TokenizeOptions {
            max_prompt_length: a.max_prompt_length,
            max_completion_length: a.max_completion_length,
        };
        let (max, mode) = (Some(a.max_length), TruncationMode::KeepStart);
        let (pairs, read, bad) = if a.method.unpaired() {
            let loaded = load_examples(std::slice::from_ref(&a.data), a.format)
                .and_then(|l| l.check(a.on_bad_row))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let (examples, mut bad) = tokenize_examples(tok, &loaded.rows, opts);
            let (pairs, dropped) = kto_pairs(examples, max, mode, a.batch_size.max(1));
            bad.extend(dropped);
            let read = loaded.rows.len() + loaded.bad.len();
            bad.extend(loaded.bad);
            (pairs, read, bad)
        } else {
            let loaded = load_file(&a.data, a.format)
                .and_then(|l| l.check(a.on_bad_row))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let (pairs, mut bad) = tokenize_rows(tok, &loaded.rows, opts);
            let (pairs, dropped) = drop_truncated_away(pairs, max, mode);
            bad.extend(dropped);
            let read = loaded.rows.len() + loaded.bad.len();
            bad.extend(loaded.bad);
            (pairs, read, bad)
        };
        if let (OnBadRow::Error, Some(b)) = (a.on_bad_row, bad.first()) {
            bail!("{b}");
        }
        if !bad.is_empty() {
            eprintln!(
                "skipped {} bad rows of {read} (on_bad_row = skip)",
                bad.len()
            );
        }
        if pairs.is_empty() {
            let what = if a.method.unpaired() {
                "examples"
            } else {
                "pairs"
            };
            bail!("{}: no usable {what}", a.data.display());
        }
        Ok(pairs)
    }
}

pub fn run(args: EvalArgs) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let json = args.json;
    let report = run_on(args.backend, EvalJob(args))??;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{:<22} {:>12}", "metric", "value");
        for (name, value) in &report.metrics {
            println!("{name:<22} {value:>12.6}");
        }
    }
    Ok(())
}
