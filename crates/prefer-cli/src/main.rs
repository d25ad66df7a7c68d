//! `prefer`: preference optimisation for Llama-style models, from the command line.

mod eval;
mod generate;
mod inspect;
mod merge;
mod pairs;
mod plot;
mod quantize;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use prefer::backend::BackendKind;

/// Preference optimisation (DPO and relatives) for Llama-style models, on the CPU, wgpu or CUDA.
#[derive(Parser)]
#[command(name = "prefer", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a LoRA adapter with DPO (TRL's DPOTrainer options); no arguments runs the built-in job.
    #[command(after_help = train::EXAMPLES)]
    Train(train::TrainArgs),
    /// Generate text from a prompt with a Hugging Face directory or a GGUF file.
    #[command(after_help = generate::EXAMPLES)]
    Generate(generate::GenerateArgs),
    /// DPO loss and preference metrics of a policy adapter against a reference, on preference pairs.
    #[command(after_help = eval::EXAMPLES)]
    Eval(eval::EvalArgs),
    /// Quantise a Hugging Face model to NF4 in bitsandbytes' checkpoint format.
    #[command(after_help = quantize::EXAMPLES)]
    Quantize(quantize::QuantizeArgs),
    /// Summarise a model, a PEFT adapter or a preference dataset.
    #[command(after_help = inspect::EXAMPLES)]
    Inspect(inspect::InspectArgs),
    /// Merge a LoRA adapter into its base model and write a Hugging Face checkpoint.
    #[command(after_help = merge::EXAMPLES)]
    Merge(merge::MergeArgs),
    /// Make preference pairs from scored responses or from single good responses.
    #[command(after_help = pairs::EXAMPLES)]
    Pairs(pairs::PairsArgs),
}

/// `--backend` values, checked at parse time; whether one is compiled in is checked when it is used.
pub fn parse_backend(s: &str) -> Result<BackendKind, String> {
    s.parse()
}

fn main() -> ExitCode {
    prefer::allocator::keep_freed_memory();
    // Errors are reported as one line; a panic would be a bug, but it too ends in one line.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        eprintln!("error: internal failure: {msg}");
    }));
    // `prefer train` takes any config key as `--key value`: those are split off before clap.
    let mut argv: Vec<String> = std::env::args().collect();
    let mut overrides = Vec::new();
    if argv.get(1).map(String::as_str) == Some("train") {
        match train::split_overrides(argv.split_off(2)) {
            Ok((rest, o)) => {
                argv.extend(rest);
                overrides = o;
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(2);
            }
        }
    }
    let cli = Cli::parse_from(argv);
    let result = match cli.command {
        Command::Train(args) => train::run(args, overrides),
        Command::Generate(args) => generate::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Pairs(args) => pairs::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
