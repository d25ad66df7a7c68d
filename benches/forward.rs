//! Forward-pass throughput of the f32 model: prefill (tokens/s over a batch) and cached decoding
//! (tokens/s, one at a time), on a random model built in-process.
//!
//! `cargo bench --bench forward` (add `--features wgpu` and `-- wgpu` for the wgpu backend).
//! Record results in benches/RESULTS.md with the machine and date.

use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData};
use prefer::llama::{
    DenseFactory, LlamaConfig, LlamaModel, MemoryWeights, SamplingConfig, generate,
};

fn config() -> LlamaConfig {
    // A 12-layer, 768-wide model with a 32k vocabulary (≈ 150M parameters, GPT-2-small-like).
    LlamaConfig {
        tie_word_embeddings: true,
        ..LlamaConfig::plain(32_000, 768, 2048, 12, 12, 4)
    }
}

fn bench<B: prefer::kernels::LayerBackend>(name: &str, device: B::Device) {
    let c = config();
    let mut weights = MemoryWeights::random(&c, 0.02, 0);
    let model: LlamaModel<B, _> =
        LlamaModel::from_weights(&c, &mut weights, &DenseFactory, &device).expect("model");

    let (batch, len) = (4, 256);
    let ids: Vec<i64> = (0..batch * len)
        .map(|i| (i * 7919 % c.vocab_size) as i64)
        .collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, len]), &device);
    let run = || {
        let h = model.forward_hidden(ids.clone(), None, None);
        B::sync(&device).expect("sync");
        h
    };
    run(); // warm-up
    let reps = 3;
    let t = Instant::now();
    for _ in 0..reps {
        run();
    }
    let prefill = (reps * batch * len) as f64 / t.elapsed().as_secs_f64();

    let prompt: Vec<u32> = (0..32).map(|i| (i * 31 % c.vocab_size) as u32).collect();
    let sampling = SamplingConfig {
        temperature: 0.0,
        max_new_tokens: 32,
        ..Default::default()
    };
    generate(&model, &prompt, &sampling, &[], |_| true).expect("warm-up generation");
    let t = Instant::now();
    let n = generate(&model, &prompt, &sampling, &[], |_| true)
        .expect("timed generation")
        .len();
    let decode = n as f64 / t.elapsed().as_secs_f64();
    println!(
        "{name}: prefill {prefill:.0} tokens/s (batch {batch} × {len}), decode {decode:.1} tokens/s (KV cache, after a 32-token prompt)"
    );
}

fn main() {
    prefer::allocator::keep_freed_memory();
    let want_wgpu = std::env::args().any(|a| a == "wgpu");
    if !want_wgpu {
        bench::<burn::backend::NdArray>("ndarray", Default::default());
    }
    #[cfg(feature = "wgpu")]
    if want_wgpu {
        bench::<burn::backend::Wgpu>("wgpu", Default::default());
    }
}
