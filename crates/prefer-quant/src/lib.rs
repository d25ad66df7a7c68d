//! NF4 (4-bit NormalFloat) weights exactly as bitsandbytes makes them — codebook, blockwise
//! absmax, nibble packing, double quantisation — and the frozen NF4 linear layer of a QLoRA model.
#![warn(missing_docs)]

pub mod double_quant;
pub mod nf4;
pub mod nf4_linear;
pub mod nf4_weight;

pub use nf4_linear::{Nf4Factory, Nf4Linear};
pub use nf4_weight::{Absmax, BlockSizeError, Nf4Weight};
