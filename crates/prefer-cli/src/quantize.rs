//! `prefer quantize`: write a bitsandbytes NF4 checkpoint that transformers loads.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use prefer::quant::{Nf4Weight, bnb::quantize_checkpoint, nf4::BLOCK_SIZES};

pub const EXAMPLES: &str = "Examples:
  prefer quantize --model path/to/hf-model --output model-nf4
  prefer quantize --model path/to/hf-model --output model-nf4-b128 --block-size 128 --no-double-quant";

#[derive(Args, Debug, Clone)]
pub struct QuantizeArgs {
    /// A Hugging Face model directory (f32, bf16 or f16 weights).
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub output: PathBuf,
    /// Values per quantisation block: a power of two from 32 to 4096.
    #[arg(long, default_value_t = 64)]
    pub block_size: usize,
    /// Keep the per-block absmax in f32 instead of 8-bit codes.
    #[arg(long)]
    pub no_double_quant: bool,
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    if !BLOCK_SIZES.contains(&args.block_size) {
        bail!(
            "--block-size must be a power of two from 32 to 4096 (got {})",
            args.block_size
        );
    }
    let double = !args.no_double_quant;
    let r = quantize_checkpoint(&args.model, &args.output, args.block_size, double)?;
    println!(
        "quantised {} Linear weights ({} parameters) to NF4: {:.2} MB, {:.3} bits per parameter ({:.3} nominal); {} parameters kept in f32",
        r.quantized_tensors,
        r.quantized_params,
        r.quantized_bytes as f64 / 1e6,
        8.0 * r.quantized_bytes as f64 / r.quantized_params as f64,
        Nf4Weight::bits_per_parameter(args.block_size, double),
        r.full_precision_params
    );
    println!("wrote {}", args.output.display());
    Ok(())
}
