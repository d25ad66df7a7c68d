//! Data-parallel scaling on the CPU: optimiser steps of the trainer with 1 replica of 4 pairs
//! against 2 replicas of 2 pairs each (the same joint batch), on one machine's cores — the shape of
//! `train_step` (hidden 256, 4 layers, vocab 4096, pairs of 256 tokens with 128-token prompts,
//! LoRA r = 8 on all seven projections over an NF4 base, f32, snapshot reference).
//!
//! Seconds per optimiser step are the trainer's own (each step from its first micro-batch to its
//! parameter update), over the steps after the first.
//!
//! `cargo bench --profile dev --bench data_parallel [-- --steps N]`

use burn::{
    backend::{Autodiff, Flex, NdArray},
    tensor::backend::Backend,
};
use prefer::{
    dpo::train::{
        IntervalStrategy, LrSchedulerType, ReferenceSource, Silent, TrainConfig, TrainRun,
        train_data_parallel,
    },
    kernels::PreferBackend,
    llama::{LlamaModel, MemoryWeights},
    lora::LoraFactory,
    quant::Nf4Factory,
};

#[path = "common/bench_shape.rs"]
mod bench_shape;
use bench_shape::{bench_llama, random_pairs};

/// Seconds per optimiser step and real tokens per second with `replicas` replicas.
fn measure<B: PreferBackend>(replicas: usize, steps: usize) -> (f64, f64) {
    type AD<B> = Autodiff<B>;
    let out = std::env::temp_dir().join(format!("prefer-bench-dp-{}", std::process::id()));
    let config = TrainConfig {
        output_dir: out.clone(),
        max_steps: steps as i64 + 1,
        per_device_train_batch_size: 4 / replicas,
        r: 8,
        lora_alpha: 16.0,
        target_modules: vec!["all-linear".into()],
        lr_scheduler_type: LrSchedulerType::Constant,
        eval_strategy: Some(IntervalStrategy::No),
        save_steps: 0,
        logging_steps: 1,
        ..Default::default()
    };
    let dev = Default::default();
    AD::<B>::seed(&dev, 1);
    let factory = LoraFactory {
        inner: Nf4Factory::default(),
        config: config.lora().unwrap(),
        adapter_name: "default".into(),
    };
    let mut weights = MemoryWeights::random(&bench_llama(512), 0.02, 3);
    let model =
        LlamaModel::<AD<B>, _>::from_weights(&bench_llama(512), &mut weights, &factory, &dev)
            .unwrap();
    let run = TrainRun {
        train: random_pairs(4 * (steps + 1), 128, 4096),
        eval: Vec::new(),
        pad_id: 0,
        reference: ReferenceSource::Snapshot,
        base_model: None,
        model_fingerprint: Default::default(),
        resume: None,
    };
    let devices = vec![dev; replicas];
    let summary = train_data_parallel(model, &devices, run, &config, &mut Silent).unwrap();
    let _ = std::fs::remove_dir_all(&out);
    // A row per step (`logging_steps = 1`): its seconds are its tokens over its tokens/s. The
    // first step warms up allocations and thread pools: the rows after it.
    let rows = &summary.history[1..];
    let seconds: f64 = rows
        .iter()
        .map(|r| r.get("tokens").unwrap() / r.get("tokens_per_second").unwrap())
        .sum();
    let tokens: f64 = rows.iter().map(|r| r.get("tokens").unwrap()).sum();
    (seconds / rows.len() as f64, tokens / seconds)
}

fn arg(key: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == key)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn table<B: PreferBackend>(name: &str, steps: usize) {
    let (one, one_tps) = measure::<B>(1, steps);
    let (two, two_tps) = measure::<B>(2, steps);
    println!("| {name} | 1 × 4 pairs | {one:.3} | {one_tps:.0} | 1.00× |");
    println!(
        "| {name} | 2 × 2 pairs | {two:.3} | {two_tps:.0} | {:.2}× |",
        one / two
    );
}

fn main() {
    let steps = arg("--steps", 5);
    println!(
        "cores: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| backend | replicas | s/step | tokens/s | speed-up |\n|---|---|---|---|---|");
    table::<Flex>("flex", steps);
    table::<NdArray>("ndarray", steps);
}
