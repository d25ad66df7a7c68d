//! `prefer pairs`: make preference pairs in TRL's format from scored responses, or from single
//! good responses with a degraded copy as the rejected one.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{ArgGroup, Args};
use prefer::dpo::pairs::{Reject, input_rows, pairs_from_scores, pairs_from_single, write_pairs};

pub const EXAMPLES: &str = "Examples:
  prefer pairs --from-scored scored.jsonl --output pairs.jsonl
  prefer pairs --from-scored scored.jsonl --min-score-diff 1 --output pairs.jsonl
  prefer pairs --from-single answers.jsonl --reject shuffle --seed 7 --output pairs.jsonl

--from-scored rows: {\"prompt\": ..., \"response\": ..., \"score\": number}; per prompt the best
response is paired with the worst, the second best with the second worst, and so on.
--from-single rows: {\"prompt\": ..., \"response\": \"...\"}; the rejected completion is the
response cut short (truncate), its sentences shuffled (shuffle) or words dropped and swapped
(perturb). Prompts may be strings or lists of messages; the output is JSON Lines with prompt,
chosen, rejected (plus chosen_score, rejected_score and metadata), ready for `prefer train`.";

#[derive(Args, Debug, Clone)]
#[command(group(ArgGroup::new("source").required(true).args(["from_scored", "from_single"])))]
pub struct PairsArgs {
    /// Scored responses: JSON Lines, a JSON array or Parquet with prompt, response and score.
    #[arg(long)]
    pub from_scored: Option<PathBuf>,
    /// Single good responses: rows with prompt and response.
    #[arg(long)]
    pub from_single: Option<PathBuf>,
    /// Keep a pair only when its scores differ by at least this much (--from-scored).
    #[arg(long, default_value_t = 0.5)]
    pub min_score_diff: f64,
    /// How the rejected completion is made (--from-single).
    #[arg(long, default_value = "truncate", value_parser = |s: &str| s.parse::<Reject>())]
    pub reject: Reject,
    /// Seed of the degradations (--from-single).
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
