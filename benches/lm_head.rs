//! Fused LM head vs the naive path (logits = h·Wᵀ, log-softmax, gather) on the CPU: time of a
//! forward + backward (gradient of the hidden states, as in LoRA training where the head is frozen)
//! and peak heap memory above what was held before, at V ∈ {32 000, 128 256} and N ∈ {1024, 8192}
//! tokens, hidden 256, chunks of 4096 vocabulary rows.
//!
//! `cargo bench --profile dev --bench lm_head` (`-- --quick` for N = 1024 only)

use std::time::Instant;

use burn::{
    backend::{Autodiff, NdArray},
    tensor::{Distribution, Int, Tensor, activation::log_softmax},
};
use prefer::kernels::{DEFAULT_CHUNK, fused_lm_head};

#[path = "common/counting_alloc.rs"]
mod counting_alloc;

#[global_allocator]
static ALLOC: counting_alloc::Counting = counting_alloc::Counting;

type AD = Autodiff<NdArray>;
const H: usize = 256;

/// (seconds, peak bytes) of forward + backward.
fn run(n: usize, v: usize, fused: bool) -> (f64, usize) {
    let dev = Default::default();
    let hidden =
        Tensor::<AD, 2>::random([n, H], Distribution::Uniform(-1.0, 1.0), &dev).require_grad();
    let weight = Tensor::<AD, 2>::random([v, H], Distribution::Uniform(-0.1, 0.1), &dev);
    let targets = Tensor::<AD, 1, Int>::random([n], Distribution::Uniform(0.0, v as f64), &dev);
    let base = counting_alloc::reset();
    let t = Instant::now();
    let logp = if fused {
        fused_lm_head(hidden.clone(), weight, targets, DEFAULT_CHUNK).logp
    } else {
        let logits = hidden.clone().matmul(weight.transpose());
        log_softmax(logits, 1)
            .gather(1, targets.reshape([n, 1]))
            .reshape([n])
    };
    let grads = logp.sum().backward();
    let g = hidden.grad(&grads).unwrap().sum().into_scalar();
    assert!(g.is_finite());
    (t.elapsed().as_secs_f64(), counting_alloc::peak_above(base))
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    println!("forward + backward (d hidden), ndarray, hidden {H}, chunk {DEFAULT_CHUNK}");
    println!(
        "{:>6} {:>7} | {:>9} {:>11} | {:>9} {:>11} | peak ratio",
        "N", "V", "naive s", "naive peak", "fused s", "fused peak"
    );
    for n in [1024, 8192] {
        if quick && n > 1024 {
            continue;
        }
        for v in [32_000, 128_256] {
            let (fs, fp) = run(n, v, true);
            // The naive path holds ~4 [N, V] f32 tensors at its peak; skip it where that would
            // not fit comfortably in this machine's memory.
            let naive_estimate = 4 * n * v * 4;
            if naive_estimate > 12_000_000_000 {
                println!(
                    "{n:>6} {v:>7} | {:>9} {:>11} | {fs:>9.2} {:>9.1}MB | naive not run (≈{:.1} GB)",
                    "-",
                    "-",
                    fp as f64 / 1e6,
                    naive_estimate as f64 / 1e9
                );
                continue;
            }
            let (ns, np) = run(n, v, false);
            println!(
                "{n:>6} {v:>7} | {ns:>9.2} {:>9.1}MB | {fs:>9.2} {:>9.1}MB | 1/{:.0}",
                np as f64 / 1e6,
                fp as f64 / 1e6,
                np as f64 / fp as f64
            );
        }
    }
}
