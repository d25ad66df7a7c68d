//! Bytes held by the frozen NF4 weights of a Llama-3.2-1B-shaped model (hidden 2048, MLP 8192,
//! 16 layers, 32/8 heads, vocab 128 256), quantised in-process from random weights and uploaded as
//! `Nf4Linear` layers. The target: the quantised Linear weights in at most 0.55 GB.
//!
//! `cargo bench --profile dev --bench nf4_memory`

use std::time::Instant;

use burn::{backend::NdArray, tensor::backend::Backend};
use prefer::{
    llama::{LlamaConfig, Projection},
    quant::{Absmax, Nf4Linear, Nf4Weight, spec_of},
};

fn config() -> LlamaConfig {
    // Llama-3.2-1B's shape.
    LlamaConfig {
        max_position_embeddings: 131_072,
        rope_theta: 500_000.0,
        tie_word_embeddings: true,
        ..LlamaConfig::plain(128_256, 2048, 8192, 16, 32, 8)
    }
}

/// Sum of four uniforms, centred and scaled: a cheap bell-shaped weight distribution.
fn random_weights(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            let mut acc = 0.0f32;
            for _ in 0..4 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                acc += (s >> 40) as f32 / (1u64 << 24) as f32;
            }
            (acc - 2.0) * 0.04
        })
        .collect()
}

fn device_bytes<B: Backend>(layer: &Nf4Linear<B>) -> usize {
    let words = layer.codes.val().dims()[0] * 4;
    let scales = layer.scales.val().dims()[0] * 4;
    let scale_codes = layer
        .scale_codes
        .as_ref()
        .map_or(0, |c| c.val().dims()[0] * 4);
    words + scales + scale_codes
}

fn main() {
    let c = config();
    let device = Default::default();
    let (mut params, mut host_bytes, mut dev_bytes) = (0usize, 0usize, 0usize);
    let mut quantize_secs = 0.0;
    for layer in 0..c.num_hidden_layers {
        for p in Projection::ALL {
            let spec = spec_of(&c, layer, p);
            let n = spec.out_features * spec.in_features;
            let values = random_weights(n, (layer * 7 + p as usize + 1) as u64);
            let t = Instant::now();
            let w = Nf4Weight::quantize(&values, [spec.out_features, spec.in_features], 64, true)
                .expect("block size");
            quantize_secs += t.elapsed().as_secs_f64();
            assert!(matches!(w.absmax, Absmax::Double { .. }));
            let l = Nf4Linear::<NdArray>::from_weight(&w, None, &device);
            params += n;
            host_bytes += w.storage_bytes();
            dev_bytes += device_bytes(&l);
        }
    }
    let embed = c.vocab_size * c.hidden_size;
    println!(
        "Llama-3.2-1B shape: {params} quantised Linear parameters (+ {embed} embedding parameters kept in full precision)"
    );
    println!(
        "  f32 Linear weights:            {:.3} GB",
        4.0 * params as f64 / 1e9
    );
    println!(
        "  NF4 (bitsandbytes layout):     {:.3} GB = {:.4} bits/parameter",
        host_bytes as f64 / 1e9,
        8.0 * host_bytes as f64 / params as f64
    );
    println!(
        "  NF4 on the device (Nf4Linear): {:.3} GB = {:.4} bits/parameter",
        dev_bytes as f64 / 1e9,
        8.0 * dev_bytes as f64 / params as f64
    );
    println!("  quantisation time: {quantize_secs:.1} s on one core");
    assert!(
        dev_bytes as f64 <= 0.55e9,
        "NF4 Linear weights take more than 0.55 GB"
    );
}
