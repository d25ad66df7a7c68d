//! `prefer merge`: fold a LoRA adapter into its base and write a plain Hugging Face checkpoint.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use prefer::lora::{MergeDtype, merge_checkpoint};

pub const EXAMPLES: &str = "Examples:
  prefer merge --model path/to/hf-model --adapter runs/dpo/adapter --output merged
  prefer merge --model model-nf4 --adapter runs/dpo/adapter --output merged-bf16 --dtype bf16";

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Dtype {
    F32,
    Bf16,
}

#[derive(Args, Debug, Clone)]
pub struct MergeArgs {
    /// The base: a Hugging Face directory (full precision or bitsandbytes 4-bit) or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub output: PathBuf,
    /// dtype of the merged weights.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    pub dtype: Dtype,
}

pub fn run(args: MergeArgs) -> Result<()> {
    let dtype = match args.dtype {
        Dtype::F32 => MergeDtype::F32,
        Dtype::Bf16 => MergeDtype::Bf16,
    };
    merge_checkpoint(&args.model, &args.adapter, &args.output, dtype)?;
    println!("wrote {}", args.output.display());
    Ok(())
}
