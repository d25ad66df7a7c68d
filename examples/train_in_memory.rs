//! Embed training in a program: load a model, build an NF4 base with a LoRA adapter, train DPO for a
//! few steps on pairs held in memory, then evaluate the adapter against the starting point.
//!
//! ```sh
//! cargo run --example train_in_memory -- tests/fixtures/llama/gqa_f32
//! ```

use burn::backend::{Autodiff, NdArray};
use prefer::{
    dpo::{
        EvalOptions,
        data::{TokenizeOptions, parse_rows, tokenize_rows},
        evaluate_pairs,
        train::{ReferenceSource, Silent, TrainConfig, TrainRun, train},
    },
    llama::Checkpoint,
    lora::{LoraFactory, set_active_adapter},
    quant::Nf4Factory,
};

type B = Autodiff<NdArray>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let model = std::env::args()
        .nth(1)
        .unwrap_or("tests/fixtures/llama/gqa_f32".into());
    let mut ckpt = Checkpoint::open(model.as_ref())?;
    let tok = ckpt.tokenizer.clone().ok_or("the model has no tokenizer")?;

    // Pairs in TRL's standard format, from memory (a JSON Lines string here).
    let lines: String = (0..24)
        .map(|i| {
            format!(
                "{{\"prompt\": \"Question {i}: can you help?\", \"chosen\": \" Yes, gladly.\", \"rejected\": \" No.\"}}\n"
            )
        })
        .collect();
    let loaded = parse_rows("<memory>", lines.as_bytes(), None)?;
    let (pairs, bad) = tokenize_rows(&tok, &loaded.rows, TokenizeOptions::default());
    assert!(bad.is_empty());
    let (train_pairs, eval_pairs) = pairs.split_at(20);

    // NF4 base, fresh LoRA adapter named "default" on every projection.
    let config = TrainConfig {
        output_dir: std::env::temp_dir().join("prefer-example-train"),
        learning_rate: 1e-3,
        max_steps: 10,
        per_device_train_batch_size: 4,
        logging_steps: 5,
        save_steps: 0,
        r: 8,
        lora_alpha: 16.0,
        target_modules: vec!["all-linear".into()],
        ..Default::default()
    };
    let device = Default::default();
    <B as burn::tensor::backend::Backend>::seed(&device, config.seed);
    let factory = LoraFactory {
        inner: Nf4Factory::default(),
        config: config.lora()?,
        adapter_name: "default".into(),
    };
    let model_path = model;
    let model = ckpt.build::<B, _>(&factory, &device)?;
    let start = model.clone();

    let run = TrainRun {
        train: train_pairs.to_vec(),
        eval: eval_pairs.to_vec(),
        pad_id: 0,
        reference: ReferenceSource::Snapshot,
        base_model: Some(model_path.clone()),
        model_fingerprint: Default::default(),
        resume: None,
    };
    let summary = train(model, run, &config, &mut Silent)?;
    println!(
        "trained {} steps; adapter in {}",
        summary.steps,
        summary.adapter_dir.display()
    );

    // Evaluate the trained adapter (loaded back from disk) against the starting model.
    let mut policy = Checkpoint::open(model_path.as_ref())?.build::<B, _>(&factory, &device)?;
    prefer::lora::load_peft(&mut policy, &summary.adapter_dir, "trained")?;
    set_active_adapter(&mut policy, Some("trained"));
    let report = evaluate_pairs(&policy, &start, eval_pairs, 0, &EvalOptions::default())?;
    for (name, value) in &report.metrics {
        println!("{name:<22} {value:>10.4}");
    }
    Ok(())
}
