//! One DPO optimiser step on the CPU backends (ndarray, burn-flex): time, tokens/s and peak heap
//! memory, for a fixed config —
//! hidden 256, 4 layers, vocab 4096, 4 heads / 2 KV heads, 4 pairs of 256-token sequences with
//! 128-token prompts, LoRA r = 8 on all seven projections over an NF4 base, f32 compute — with the
//! reference as a frozen adapter snapshot over the same base, and with no reference forward at all
//! (reference log-probs given), to price the snapshot; and one KTO step on as many rows (4
//! examples, each a completion and a KL completion) with the KL completions in the same batch as
//! the completions or apart from them, as the trainer runs them.
//!
//! Peak memory is counted by this binary's global allocator: the largest number of heap bytes held
//! during the step, above what was held before it.
//!
//! `cargo bench --profile dev --bench train_step`

use std::time::Instant;

use burn::{
    backend::{Autodiff, Flex, NdArray},
    optim::AdamWConfig,
    tensor::{Tensor, backend::Backend},
    train::TrainStep,
};
use prefer::{
    dpo::{
        LossConfig,
        data::{TokenizedPair, collate, collate_kto},
        loss::Method,
        train::{DpoInput, DpoPolicy},
    },
    kernels::PreferBackend,
    llama::{LlamaModel, MemoryWeights},
    lora::{LoraConfig, LoraFactory, snapshot_adapter},
    quant::{Nf4Factory, Nf4Linear},
};

#[path = "common/bench_shape.rs"]
mod bench_shape;
use bench_shape::{bench_llama, random_pairs};

#[path = "common/counting_alloc.rs"]
mod counting_alloc;

#[global_allocator]
static ALLOC: counting_alloc::Counting = counting_alloc::Counting;

struct Measured {
    step_s: f64,
    tokens_per_s: f64,
    peak_bytes: usize,
}

/// How the step is set up: DPO with or without the snapshot reference, or KTO (snapshot
/// reference) with its KL completions in the batch or apart.
#[derive(Clone, Copy)]
enum Run {
    Dpo { snapshot: bool },
    Kto { apart: bool },
}

fn measure<B: PreferBackend>(run: Run) -> Measured {
    let snapshot = !matches!(run, Run::Dpo { snapshot: false });
    type AD<B> = Autodiff<B>;
    let dev = Default::default();
    AD::<B>::seed(&dev, 1);
    let lora = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        ..Default::default()
    };
    let factory = LoraFactory {
        inner: Nf4Factory::default(),
        config: lora,
        adapter_name: "default".into(),
    };
    let mut weights = MemoryWeights::random(&bench_llama(512), 0.02, 3);
    let mut model =
        LlamaModel::from_weights(&bench_llama(512), &mut weights, &factory, &dev).unwrap();
    if snapshot {
        snapshot_adapter(&mut model, "default", "reference");
    }
    let loss = match run {
        Run::Kto { .. } => LossConfig {
            method: Method::Kto,
            ..Default::default()
        },
        Run::Dpo { .. } => Default::default(),
    };
    let mut policy = DpoPolicy::<AD<B>, Nf4Linear<AD<B>>> {
        model,
        loss,
        reference: snapshot.then(|| "reference".to_string()),
    };
    let mut optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.0)
        .init();
    let mut data = random_pairs(4, 128, 4096);
    if let Run::Kto { .. } = run {
        // Each pair as one example: its chosen completion, alternately desirable or not, with the
        // neighbouring example's completion as its KL completion.
        let completions: Vec<Vec<u32>> = data.iter().map(|p| p.chosen.clone()).collect();
        for (i, p) in data.iter_mut().enumerate() {
            p.rejected = completions[(i + completions.len() - 1) % completions.len()].clone();
            p.label = Some(i % 2 == 0);
        }
    }
    let picked: Vec<&TokenizedPair> = data.iter().collect();
    let layout = Default::default();
    let (batch, kl_batch) = match run {
        Run::Kto { apart: true } => {
            let (batch, kl) = collate_kto(&picked, 0, None, Default::default());
            (batch, Some(kl.to_device::<AD<B>>(&dev, layout)))
        }
        _ => (collate(&picked, 0, None, Default::default()), None),
    };
    let batch = batch.to_device::<AD<B>>(&dev, layout);
    let tokens = 8 * 256;
    let ref_logps = (!snapshot).then(|| Tensor::<AD<B>, 1>::from_floats([-700.0; 8], &dev));
    let input = DpoInput {
        batch,
        kl_batch,
        ref_logps,
    };
    let (warmup, steps) = (2, 5);
    let mut peak = 0;
    let mut total = 0.0;
    for i in 0..warmup + steps {
        let base = counting_alloc::reset();
        let t = Instant::now();
        let out = TrainStep::step(&policy, input.clone());
        policy = TrainStep::optimize(policy, &mut optim, 1e-4, out.grads);
        let secs = t.elapsed().as_secs_f64();
        if i >= warmup {
            total += secs;
            peak = peak.max(counting_alloc::peak_above(base));
        }
    }
    Measured {
        step_s: total / steps as f64,
        tokens_per_s: tokens as f64 * steps as f64 / total,
        peak_bytes: peak,
    }
}

fn table<B: PreferBackend>(name: &str) {
    println!(
        "DPO step, {name}, hidden 256 / 4 layers / vocab 4096, 4 pairs × 256 tokens, LoRA r 8 on 7 projections, NF4 base"
    );
    let none = measure::<B>(Run::Dpo { snapshot: false });
    let snap = measure::<B>(Run::Dpo { snapshot: true });
    for (name, m) in [
        ("no reference forward", &none),
        ("snapshot reference", &snap),
    ] {
        println!(
            "{name:<22} step {:>7.3} s  {:>8.0} tokens/s  peak {:>7.1} MB",
            m.step_s,
            m.tokens_per_s,
            m.peak_bytes as f64 / 1e6
        );
    }
    println!(
        "snapshot reference costs {:+.1} % peak memory over no reference",
        100.0 * (snap.peak_bytes as f64 / none.peak_bytes as f64 - 1.0)
    );
    println!(
        "KTO step, {name}, the same shape: 4 examples × (completion + KL completion), snapshot reference"
    );
    for (label, apart) in [("KL rows in the batch", false), ("KL rows apart", true)] {
        let m = measure::<B>(Run::Kto { apart });
        println!(
            "{label:<22} step {:>7.3} s  {:>8.0} tokens/s  peak {:>7.1} MB",
            m.step_s,
            m.tokens_per_s,
            m.peak_bytes as f64 / 1e6
        );
    }
}

fn main() {
    prefer::allocator::keep_freed_memory();
    table::<NdArray>("ndarray");
    table::<Flex>("burn-flex");
}
