//! `prefer pairs`: make preference pairs in TRL's format from scored responses, or from single
//! good responses with a degraded copy as the rejected one.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{ArgGroup, Args};
use prefer::{
    backend::{BackendJob, BackendKind, run_on},
    dpo::pairs::{
        Judge, MadePair, Reject, SampleOptions, input_rows, pairs_from_samples, pairs_from_scores,
        pairs_from_single, prompt_rows, sample_completions, write_pairs,
    },
    llama::{Checkpoint, DenseFactory, LinearFactory, LinearLayer, SamplingConfig},
    lora::{LoraFactory, LoraLinear, load_peft, set_active_adapter},
    quant::Nf4Factory,
};

pub const EXAMPLES: &str = "Examples:
  prefer pairs --from-scored scored.jsonl --output pairs.jsonl
  prefer pairs --from-scored scored.jsonl --min-score-diff 1 --output pairs.jsonl
  prefer pairs --from-single answers.jsonl --reject shuffle --seed 7 --output pairs.jsonl
  prefer pairs --from-prompts prompts.jsonl --model path/to/hf-model --adapter runs/dpo/adapter \
               --samples 4 --judge 'regex:(?i)thank' --output pairs.jsonl
  prefer pairs --from-prompts prompts.jsonl --model m.gguf --judge 'command:python3 score.py' --output pairs.jsonl

--from-scored rows: {\"prompt\": ..., \"response\": ..., \"score\": number}; per prompt the best
response is paired with the worst, the second best with the second worst, and so on.
--from-single rows: {\"prompt\": ..., \"response\": \"...\"}; the rejected completion is the
response cut short (truncate), its sentences shuffled (shuffle) or words dropped and swapped
(perturb).
--from-prompts rows: {\"prompt\": ..., \"reference\": \"...\" (optional)}; --samples completions are
sampled per prompt from the model (with --adapter), scored by --judge and paired as --from-scored
pairs them. Judges: length (characters), regex:PATTERN (number of matches), contains:TEXT (1 or 0),
exact (1 when the completion equals the row's reference), command:CMD (`sh -c CMD` reads one JSON
line {\"prompt\", \"response\", \"reference\"} per completion and prints one score per line).
Prompts may be strings or lists of messages; the output is JSON Lines with prompt, chosen, rejected
(plus chosen_score, rejected_score and metadata), ready for `prefer train`.";

#[derive(Args, Debug, Clone)]
#[command(group(ArgGroup::new("source").required(true).args(["from_scored", "from_single", "from_prompts"])))]
pub struct PairsArgs {
    /// Scored responses: JSON Lines, a JSON array or Parquet with prompt, response and score.
    #[arg(long)]
    pub from_scored: Option<PathBuf>,
    /// Single good responses: rows with prompt and response.
    #[arg(long)]
    pub from_single: Option<PathBuf>,
    /// Prompts to sample completions for (on-policy pairs): rows with prompt and an optional
    /// reference answer.
    #[arg(long, requires_all = ["model", "judge"])]
    pub from_prompts: Option<PathBuf>,
    /// The model that samples (--from-prompts): a Hugging Face directory or a .gguf file.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A PEFT adapter on the model (--from-prompts), e.g. the last round's policy.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Completions sampled per prompt (--from-prompts).
    #[arg(long, default_value_t = 4)]
    pub samples: usize,
    /// How completions are scored (--from-prompts): length, regex:PATTERN, contains:TEXT, exact
    /// or command:CMD.
    #[arg(long, value_parser = |s: &str| s.parse::<Judge>())]
    pub judge: Option<Judge>,
    /// Sampling temperature (--from-prompts); 0 is greedy, which makes every sample the same.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass (--from-prompts).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Longest completion, in tokens (--from-prompts).
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Completions generated in one batch (--from-prompts).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Backend that samples (--from-prompts): ndarray, flex, wgpu or cuda (among those compiled in).
    #[arg(long, default_value = "flex", value_parser = crate::parse_backend)]
    pub backend: BackendKind,
    /// Keep a pair only when its scores differ by at least this much (--from-scored,
    /// --from-prompts).
    #[arg(long, default_value_t = 0.5)]
    pub min_score_diff: f64,
    /// How the rejected completion is made (--from-single).
    #[arg(long, default_value = "truncate", value_parser = |s: &str| s.parse::<Reject>())]
    pub reject: Reject,
    /// Seed of the degradations (--from-single) and of the sampler (--from-prompts).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// The pairs, as JSON Lines (written whole or not at all).
    #[arg(long)]
    pub output: PathBuf,
}

pub fn run(args: PairsArgs) -> Result<()> {
    if !(args.min_score_diff >= 0.0 && args.min_score_diff.is_finite()) {
        anyhow::bail!("--min-score-diff must be a non-negative number");
    }
    let (pairs, summary) = if let Some(path) = &args.from_scored {
        let (pairs, r) = pairs_from_scores(input_rows(path)?, args.min_score_diff)?;
        let summary = format!(
            "{} pairs from {} rows of {} prompts; dropped: {} ties, {} below --min-score-diff {}, \
             {} prompts with a single response",
            r.pairs,
            r.rows,
            r.prompts,
            r.ties,
            r.below_min_diff,
            args.min_score_diff,
            r.single_responses
        );
        (pairs, summary)
    } else if let Some(path) = &args.from_prompts {
        from_prompts(path, &args)?
    } else {
        let path = args.from_single.as_ref().context("--from-single")?;
        let (pairs, r) = pairs_from_single(input_rows(path)?, args.reject, args.seed)?;
        let summary = format!(
            "{} pairs from {} rows (--reject {}); {} responses too short to degrade",
            r.pairs, r.rows, args.reject, r.too_short
        );
        (pairs, summary)
    };
    if pairs.is_empty() {
        anyhow::bail!("no pairs: {summary}; nothing written");
    }
    write_pairs(&args.output, &pairs)
        .with_context(|| format!("{}: could not write the pairs", args.output.display()))?;
    println!("{summary}");
    println!("wrote {}", args.output.display());
    Ok(())
}

/// On-policy pairs: sample, judge, pair; the summary line says what became of the samples.
fn from_prompts(path: &std::path::Path, args: &PairsArgs) -> Result<(Vec<MadePair>, String)> {
    if args.samples < 2 {
        bail!("--samples must be at least 2: a pair needs two completions of a prompt");
    }
    if args.temperature.is_nan() || args.temperature < 0.0 {
        bail!("--temperature must be 0 or more (got {})", args.temperature);
    }
    if args.top_p.is_nan() || args.top_p <= 0.0 || args.top_p > 1.0 {
        bail!("--top-p must be in (0, 1] (got {})", args.top_p);
    }
    let judge = args.judge.clone().context("--judge")?;
    let records = input_rows(path)?;
    let (rows, completions) = run_on(args.backend, SampleJob { args, records })??;
    let (pairs, r) = pairs_from_samples(&rows, &completions, &judge, args.min_score_diff)?;
    let summary = format!(
        "{} pairs from {} completions of {} prompts (judge {judge}); dropped: {} empty \
         completions, {} ties, {} below --min-score-diff {}",
        r.scored.pairs,
        r.sampled,
        rows.len(),
        r.empty,
        r.scored.ties,
        r.scored.below_min_diff,
        args.min_score_diff
    );
    Ok((pairs, summary))
}

/// Samples `--samples` completions of every prompt on the chosen backend.
struct SampleJob<'a> {
    args: &'a PairsArgs,
    records: Vec<prefer::dpo::pairs::InputRow>,
}

/// The prompt rows and their completions, `[row][sample]`.
type Sampled = (Vec<prefer::dpo::pairs::PromptRow>, Vec<Vec<String>>);

impl BackendJob for SampleJob<'_> {
    type Output = Result<Sampled>;
    fn run<B: prefer::kernels::PreferBackend>(self, device: B::Device) -> Result<Sampled> {
        let model = self.args.model.as_ref().context("--model")?;
        let mut ckpt = Checkpoint::open(model)?;
        if ckpt.is_bnb_4bit() {
            self.sample::<B, _>(&mut ckpt, Nf4Factory::default(), &device)
        } else {
            self.sample::<B, _>(&mut ckpt, DenseFactory, &device)
        }
    }
}

impl SampleJob<'_> {
    fn sample<B: prefer::kernels::PreferBackend, F: LinearFactory<B>>(
        self,
        ckpt: &mut Checkpoint,
        inner: F,
        device: &B::Device,
    ) -> Result<Sampled>
    where
        LoraLinear<B, F::Layer>: LinearLayer<B>,
    {
        let a = self.args;
        let tok = ckpt.tokenizer.clone().with_context(|| {
            format!(
                "{}: the model has no tokenizer",
                a.model
                    .as_deref()
                    .unwrap_or_else(|| std::path::Path::new(""))
                    .display()
            )
        })?;
        // Prompts first: a bad row stops the command before any model work.
        let rows = prompt_rows(self.records, &tok)?;
        let factory = LoraFactory::without_adapters(inner);
        let mut model = ckpt.build(&factory, device)?;
        if let Some(dir) = &a.adapter {
            load_peft(&mut model, dir, "policy")?;
            set_active_adapter(&mut model, Some("policy"));
        }
        let options = SampleOptions {
            samples: a.samples,
            sampling: SamplingConfig {
                temperature: a.temperature,
                top_p: a.top_p,
                seed: a.seed,
                max_new_tokens: a.max_new_tokens,
                min_new_tokens: 0,
            },
            batch_size: a.batch_size,
        };
        let completions =
            sample_completions(&model, &tok, &rows, &options).map_err(anyhow::Error::msg)?;
        Ok((rows, completions))
    }
}
