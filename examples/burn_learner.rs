//! Train a LoRA adapter with DPO through burn-train's own `SupervisedTraining` loop, with prefer's
//! preference metrics (`rewards/accuracies`, `rewards/margins`, `kl`, …) registered as burn-train
//! metrics: they appear in burn-train's renderer and its file logger (`<dir>/train`, `<dir>/valid`).
//!
//! ```sh
//! cargo run --example burn_learner -- tests/fixtures/llama/gqa_f32
//! ```
//!
//! This is burn-train's loop, not TRL's, and its semantics differ from `prefer train` and
//! [`prefer::dpo::train::train`]:
//! - the learning-rate schedule steps once per micro-batch, not once per optimiser step;
//! - with `grads_accumulation`, the micro-batches' gradients are summed, not averaged;
//! - gradient clipping (if configured on the optimiser) is per tensor, not one global L2 norm;
//! - checkpoints are written per epoch and resume at an epoch boundary, not at a data position;
//! - the reference is whatever the policy's `reference` adapter is (a snapshot here); there is no
//!   precomputed reference, TR-DPO sync, early stopping on TRL's metrics or best-model selection.
//!
//! Prefer `prefer::dpo::train::train` when the numbers must match TRL's or a run must resume
//! exactly; use this path to put DPO inside a Burn program that already trains with burn-train.

use burn::{
    backend::{Autodiff, NdArray},
    data::{
        dataloader::{DataLoaderBuilder, batcher::Batcher},
        dataset::InMemDataset,
    },
    optim::AdamWConfig,
    tensor::backend::Backend,
    train::{Learner, SupervisedTraining},
};
use prefer::{
    dpo::{
        Packing,
        data::{TokenizeOptions, TokenizedPair, collate, parse_rows, tokenize_rows},
        train::{
            DpoInput, DpoPolicy, LrSchedule, LrSchedulerType, PreferenceMetric, REFERENCE_ADAPTER,
            TrainConfig,
        },
    },
    llama::Checkpoint,
    lora::{LoraFactory, snapshot_adapter},
    quant::{Nf4Factory, Nf4Linear},
};

type B = Autodiff<NdArray>;

/// Batches of pairs as the policy's `TrainStep` / `InferenceStep` take them, reference run in the
/// step.
#[derive(Clone)]
struct PairBatcher {
    pad_id: u32,
    max_length: Option<usize>,
}

impl<Bk: Backend> Batcher<Bk, TokenizedPair, DpoInput<Bk>> for PairBatcher {
    fn batch(&self, items: Vec<TokenizedPair>, device: &Bk::Device) -> DpoInput<Bk> {
        let refs: Vec<&TokenizedPair> = items.iter().collect();
        DpoInput {
            batch: collate(&refs, self.pad_id, self.max_length, Default::default())
                .to_device(device, Packing::PaddingFree),
            kl_batch: None,
            ref_logps: None,
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let model_path = std::env::args()
        .nth(1)
        .unwrap_or("tests/fixtures/llama/gqa_f32".into());
    let mut ckpt = Checkpoint::open(model_path.as_ref())?;
    let tok = ckpt.tokenizer.clone().ok_or("the model has no tokenizer")?;

    // Pairs in TRL's standard format, held in memory.
    let lines: String = (0..40)
        .map(|i| {
            format!(
                "{{\"prompt\": \"Question {i}: can you help?\", \"chosen\": \" Yes, gladly.\", \"rejected\": \" No.\"}}\n"
            )
        })
        .collect();
    let loaded = parse_rows("<memory>", lines.as_bytes(), None)?;
    let (pairs, bad) = tokenize_rows(&tok, &loaded.rows, TokenizeOptions::default());
    assert!(bad.is_empty(), "{bad:?}");
    let (train_pairs, valid_pairs) = pairs.split_at(32);

    // NF4 base, a fresh LoRA adapter `default` on every projection, and its frozen snapshot as
    // the reference.
    let config = TrainConfig {
        r: 8,
        lora_alpha: 16.0,
        target_modules: vec!["all-linear".into()],
        ..Default::default()
    };
    let device = Default::default();
    <B as Backend>::seed(&device, config.seed);
    let factory = LoraFactory {
        inner: Nf4Factory::default(),
        config: config.lora()?,
        adapter_name: "default".into(),
    };
    let mut model = ckpt.build::<B, _>(&factory, &device)?;
    snapshot_adapter(&mut model, "default", REFERENCE_ADAPTER);
    let policy = DpoPolicy::<B, Nf4Linear<B>> {
        model,
        loss: config.loss(),
        reference: Some(REFERENCE_ADAPTER.into()),
    };

    let batcher = PairBatcher {
        pad_id: 0,
        max_length: config.max_length,
    };
    let train = DataLoaderBuilder::new(batcher.clone())
        .batch_size(4)
        .shuffle(config.seed)
        .build(InMemDataset::new(train_pairs.to_vec()));
    let valid = DataLoaderBuilder::new(batcher)
        .batch_size(8)
        .build(InMemDataset::new(valid_pairs.to_vec()));

    let dir = std::env::temp_dir().join("prefer-example-burn-learner");
    let _ = std::fs::remove_dir_all(&dir);
    let mut training = SupervisedTraining::new(&dir, train, valid).num_epochs(3);
    for metric in PreferenceMetric::all(&config.loss()) {
        training = training
            .metric_train_numeric(metric.clone())
            .metric_valid_numeric(metric);
    }
    let schedule = LrSchedule {
        kind: LrSchedulerType::Constant,
        kwargs: Default::default(),
        peak: 2e-3,
        warmup: 0,
        total: 1,
        step: 0,
    };
    let optim = AdamWConfig::new().init();
    let result = training.launch(Learner::new(policy, optim, schedule));

    // The trained policy, scored on the held-out pairs with prefer's own metrics.
    let valid_input: DpoInput<NdArray> = PairBatcher {
        pad_id: 0,
        max_length: config.max_length,
    }
    .batch(valid_pairs.to_vec(), &device);
    let out = result.model.infer(valid_input)?;
    let metrics = out.records.metrics_of(config.method, config.beta);
    println!(
        "held-out: loss {:.4}, rewards/accuracies {:.2}, rewards/margins {:.4}",
        out.loss, metrics["rewards/accuracies"], metrics["rewards/margins"]
    );
    println!("burn-train's logs: {}", dir.display());
    Ok(())
}
