//! The trainer runs the same on every backend compiled in: a few DPO steps over an NF4 base from a
//! fixed starting adapter give the same metrics on ndarray, burn-flex and wgpu (lavapipe in CI).

mod common;

use std::{cell::RefCell, path::PathBuf};

use burn::backend::Autodiff;
use common::{Checker, on_each_backend};
use prefer::{
    dpo::{
        data::{TokenizeOptions, load_file, tokenize_rows},
        train::{
            LogRecord, LrSchedulerType, ReferenceSource, Silent, TrainConfig, TrainRun, train,
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
    results: RefCell<Vec<(String, LogRecord, LogRecord)>>,
}

impl Checker for FewSteps {
    fn run<B: PreferBackend>(&self, device: &B::Device) {
        let name = std::any::type_name::<B>().to_string();
        let out = std::env::temp_dir().join(format!(
            "prefer-train-backends-{}-{}",
            self.results.borrow().len(),
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
    let check = FewSteps {
        results: RefCell::new(Vec::new()),
    };
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
