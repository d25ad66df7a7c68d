//! The trainer runs the same on every backend compiled in: a few DPO steps over an NF4 base from a
//! fixed starting adapter give the same metrics on ndarray, burn-flex and wgpu (lavapipe in CI);
//! in half precision (bf16 and fp16 on flex, fp16 on wgpu), close to float32's, with activation
//! checkpointing the same as without.

mod common;

use std::{cell::RefCell, path::PathBuf};

use burn::backend::Autodiff;
use common::{Checker, on_each_backend};
use prefer::{
    dpo::{
        data::{TokenizeOptions, load_file, tokenize_rows},
        train::{
            ComputeDtype, LogRecord, LrSchedulerType, ReferenceSource, Silent, TrainConfig,
            TrainRun, train,
        },
    },
    kernels::PreferBackend,
    llama::Checkpoint,
    lora::{LoraConfig, LoraFactory, load_peft},
    quant::Nf4Factory,
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct FewSteps {
    /// Per run: the backend and precision, the last training log row and the final evaluation.
    results: RefCell<Vec<(String, LogRecord, LogRecord)>>,
    /// The compute types to run in, each when the backend has it (float32 always).
    precisions: Vec<ComputeDtype>,
    /// Also run each half-precision type with activation checkpointing.
    checkpointing: bool,
}

impl FewSteps {
    fn new(precisions: Vec<ComputeDtype>, checkpointing: bool) -> Self {
        Self {
            results: RefCell::new(Vec::new()),
            precisions,
            checkpointing,
        }
    }
}

impl Checker for FewSteps {
    fn run<B: PreferBackend>(&self, device: &B::Device) {
        let backend = std::any::type_name::<B>();
        for &dtype in &self.precisions {
            let supported = B::supports_dtype(device, dtype.float_dtype().into());
            // wgpu must compute in f16 (lavapipe in CI does): a missing type fails, not skips.
            let required = backend.contains("Wgpu") && dtype == ComputeDtype::Float16;
            assert!(supported || !required, "{backend} has no {}", dtype.name());
            if !supported && dtype != ComputeDtype::Float32 {
                continue;
            }
            let checkpointing = [false, true];
            let n = if self.checkpointing && dtype != ComputeDtype::Float32 {
                2
            } else {
                1
            };
            for &ckpt in &checkpointing[..n] {
                self.run_one::<B>(device, dtype, ckpt);
            }
        }
    }
}

impl FewSteps {
    fn run_one<B: PreferBackend>(&self, device: &B::Device, dtype: ComputeDtype, recompute: bool) {
        let name = format!(
            "{} | {}{}",
            std::any::type_name::<B>(),
            dtype.name(),
            if recompute { " + checkpointing" } else { "" }
        );
        // One directory per run: the tests of this file run at once in one process.
        static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let out = std::env::temp_dir().join(format!(
            "prefer-train-backends-{run}-{}",
            std::process::id()
        ));
        let mut ckpt = Checkpoint::open(&fixtures().join("llama/gqa_f32")).unwrap();
        let tok = ckpt.tokenizer.clone().unwrap();
        let rows = load_file(&fixtures().join("dpo/standard.jsonl"), None).unwrap();
        let (pairs, bad) = tokenize_rows(&tok, &rows.rows, TokenizeOptions::default());
        assert!(bad.is_empty());
        // A fixed, non-zero starting adapter: every backend starts from the same numbers.
        let factory = LoraFactory {
            inner: Nf4Factory::default(),
            config: LoraConfig {
                target_modules: vec![],
                ..Default::default()
            },
            adapter_name: "default".into(),
        };
        let mut model = ckpt.build::<Autodiff<B>, _>(&factory, device).unwrap();
        load_peft(&mut model, &fixtures().join("dpo/adapter"), "default").unwrap();
        let config = TrainConfig {
            output_dir: out.clone(),
            learning_rate: 1e-3,
            max_steps: 3,
            per_device_train_batch_size: 5,
            lr_scheduler_type: LrSchedulerType::Constant,
            logging_steps: 1,
            save_steps: 0,
            r: 4,
            lora_alpha: 8.0,
            target_modules: vec!["all-linear".into()],
            bnb_4bit_compute_dtype: dtype,
            gradient_checkpointing: recompute,
            ..Default::default()
        };
        let run = TrainRun {
            train: pairs.clone(),
            eval: pairs,
            pad_id: 0,
            reference: ReferenceSource::Snapshot,
            base_model: None,
            model_fingerprint: Default::default(),
            resume: None,
        };
        let s = train(model, run, &config, &mut Silent).unwrap();
        let last_train = s
            .history
            .iter()
            .rev()
            .find(|r| !r.is_eval())
            .unwrap()
            .clone();
        self.results
            .borrow_mut()
            .push((name, last_train, s.final_eval.unwrap()));
        std::fs::remove_dir_all(out).unwrap();
    }
}

#[test]
fn a_few_steps_give_the_same_metrics_on_every_backend() {
    let check = FewSteps::new(vec![ComputeDtype::Float32], false);
    on_each_backend("trainer", &check);
    let results = check.results.into_inner();
    let (first, train0, eval0) = &results[0];
    assert!(
        eval0.get("eval_rewards/margins").unwrap() > 0.0,
        "three steps move the margins"
    );
    for (name, train, eval) in &results[1..] {
        for (a, b) in [(train0, train), (eval0, eval)] {
            for (k, x) in &a.values {
                if k.contains("tokens_per_second") {
                    continue;
                }
                let y = b.get(k).unwrap();
                assert!(
                    (x - y).abs() <= 2e-3 * x.abs().max(1.0),
                    "{k}: {first} {x} vs {name} {y}"
                );
            }
        }
    }
}

/// bf16 and fp16 training on each backend that has the type: the metrics of three steps stay
/// within half precision's reach of float32's on the same backend (bf16 keeps 8 significant bits:
/// log-probs of ~40 nats move by ~0.3, see `half_precision_is_as_close_to_float32_as_trls`), and
/// activation checkpointing in half precision changes nothing.
#[test]
fn half_precision_trains_close_to_float32_and_checkpoints_the_same() {
    use ComputeDtype::{Bfloat16, Float16, Float32};
    let check = FewSteps::new(vec![Float32, Bfloat16, Float16], true);
    on_each_backend("trainer in half precision", &check);
    let results = check.results.into_inner();
    let ran: Vec<&str> = results.iter().map(|r| r.0.as_str()).collect();
    assert!(
        ran.iter()
            .any(|n| n.contains("Flex") && n.contains("bfloat16")),
        "{ran:?}"
    );
    for (name, train, eval) in &results {
        let Some((base, _)) = name.split_once(" | ") else {
            continue;
        };
        let (_, f32_train, f32_eval) = results
            .iter()
            .find(|r| r.0 == format!("{base} | float32"))
            .unwrap();
        let plain = name.trim_end_matches(" + checkpointing");
        let (_, p_train, p_eval) = results.iter().find(|r| r.0 == plain).unwrap();
        for (a, b, same) in [(f32_train, train, p_train), (f32_eval, eval, p_eval)] {
            for (k, x) in &a.values {
                if k.contains("tokens_per_second") {
                    continue;
                }
                let (y, z) = (b.get(k).unwrap(), same.get(k).unwrap());
                assert!(
                    (x - y).abs() <= 5e-2 * x.abs().max(1.0),
                    "{k}: {name} {y} vs float32 {x}"
                );
                assert!(
                    (y - z).abs() <= 1e-5 * z.abs().max(1.0),
                    "{k}: {name} {y} vs without checkpointing {z}"
                );
            }
        }
    }
}
