//! NF4 (4-bit NormalFloat) weights exactly as bitsandbytes makes them — codebook, blockwise
//! absmax, nibble packing, double quantisation — and the frozen NF4 linear layer of a QLoRA model.
#![warn(missing_docs)]

pub mod bnb;
pub mod double_quant;
pub mod nf4;
pub mod nf4_linear;
pub mod nf4_weight;
mod safetensors_io;

pub use safetensors_io::write_safetensors;

pub use nf4_linear::{Nf4Factory, Nf4Linear};
pub use nf4_weight::{Absmax, BlockSizeError, Nf4Weight};

/// The spec of a projection of layer `layer` under `config`.
pub fn spec_of(
    config: &prefer_llama::LlamaConfig,
    layer: usize,
    projection: prefer_llama::Projection,
) -> prefer_llama::LinearSpec {
    use prefer_llama::Projection::*;
    let c = config;
    let (q, kv, h, m) = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        c.hidden_size,
        c.intermediate_size,
    );
    let (out_features, in_features, bias) = match projection {
        Q => (q, h, c.qkv_bias),
        K | V => (kv, h, c.qkv_bias),
        O => (h, q, c.o_bias),
        Gate | Up => (m, h, c.mlp_bias),
        Down => (h, m, c.mlp_bias),
    };
    prefer_llama::LinearSpec {
        site: prefer_llama::LinearSite { layer, projection },
        out_features,
        in_features,
        bias,
    }
}
