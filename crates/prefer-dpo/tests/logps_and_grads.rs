//! Log-probs, losses and LoRA gradients of a real forward pass against TRL 1.16: the tiny Llama with
//! a PEFT adapter as policy and the base (adapter off) as reference, on TRL's own batch.

use std::path::PathBuf;

use burn::{
    backend::{Autodiff, NdArray},
    tensor::{Int, Tensor, TensorData, backend::Backend},
};
use prefer_dpo::{DpoBatch, LossConfig, evaluate_batch};
use prefer_llama::{Checkpoint, DenseFactory, DenseLinear, LlamaModel};
use prefer_lora::{LoraConfig, LoraFactory, LoraLinear, load_peft, peft_key, set_active_adapter};
use safetensors::SafeTensors;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn fixture() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("dpo/losses.json")).unwrap()).unwrap()
}

fn rows(x: &Value) -> (Vec<i64>, [usize; 2]) {
    let rows: Vec<Vec<i64>> = x
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect()
        })
        .collect();
    let shape = [rows.len(), rows[0].len()];
    (rows.concat(), shape)
}

fn batch<B: Backend>(f: &Value, device: &B::Device) -> DpoBatch<B> {
    let b = &f["batch"];
    let (ids, shape) = rows(&b["input_ids"]);
    let (mask, _) = rows(&b["attention_mask"]);
    let (comp, _) = rows(&b["completion_mask"]);
    DpoBatch {
        input_ids: Tensor::<B, 2, Int>::from_data(TensorData::new(ids, shape), device),
        attention_mask: Tensor::<B, 2, Int>::from_data(TensorData::new(mask, shape), device),
        completion_mask: Tensor::from_data(
            TensorData::new(comp.iter().map(|&x| x as f32).collect::<Vec<_>>(), shape),
            device,
        ),
    }
}

type Model<B> = LlamaModel<B, LoraLinear<B, DenseLinear<B>>>;

fn models<B: Backend>(device: &B::Device) -> (Model<B>, Model<B>) {
    let factory = LoraFactory {
        inner: DenseFactory,
        config: LoraConfig {
            target_modules: vec![],
            ..Default::default()
        },
        adapter_name: "x".into(),
    };
    let mut policy: Model<B> = Checkpoint::open(&root().join("llama/gqa_f32"))
        .unwrap()
        .build(&factory, device)
        .unwrap();
    load_peft(&mut policy, &root().join("dpo/adapter"), "default").unwrap();
    let mut reference = policy.clone();
    set_active_adapter(&mut reference, None);
    (policy, reference)
}

fn floats(x: &Value) -> Vec<f64> {
    x.as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

#[test]
fn log_probs_losses_and_metrics_match_trl() {
    type B = NdArray;
    let device = Default::default();
    let f = fixture();
    let (policy, reference) = models::<B>(&device);
    let out = evaluate_batch(
        &LossConfig::default(),
        &policy,
        &reference,
        &batch::<B>(&f, &device),
    );
    let r = out.records();
    let p = &f["per_pair"];
    for (name, got, key) in [
        ("policy chosen", &r.chosen, "policy_chosen_logps"),
        ("policy rejected", &r.rejected, "policy_rejected_logps"),
        ("reference chosen", &r.ref_chosen, "reference_chosen_logps"),
        (
            "reference rejected",
            &r.ref_rejected,
            "reference_rejected_logps",
        ),
    ] {
        for (g, w) in got.iter().zip(floats(&p[key])) {
            assert!((g - w).abs() <= 1e-4, "{name}: {g} vs TRL {w}");
        }
    }
    assert_eq!(r.chosen_tokens, floats(&p["chosen_token_counts"]));
    let loss: f32 = out.loss.into_scalar();
    let want = f["losses"]["label_smoothing_0.1"]["sigmoid"]["loss"]
        .as_f64()
        .unwrap();
    assert!(
        (loss as f64 - want).abs() <= 1e-5,
        "loss {loss} vs TRL {want}"
    );
    let metrics = r.metrics(0.1);
    let trl = f["losses"]["label_smoothing_0.1"]["sigmoid"]["metrics"]
        .as_object()
        .unwrap();
    for name in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logits/chosen",
        "logits/rejected",
    ] {
        let (g, w) = (metrics[name], trl[name].as_f64().unwrap());
        assert!(
            (g - w).abs() <= 1e-5 + 1e-4 * w.abs(),
            "{name}: {g} vs TRL {w}"
        );
    }
}

#[test]
fn lora_gradients_match_trl() {
    type B = Autodiff<NdArray>;
    let device = Default::default();
    let f = fixture();
    let (policy, reference) = models::<B>(&device);
    let out = evaluate_batch(
        &LossConfig::default(),
        &policy,
        &reference,
        &batch::<B>(&f, &device),
    );
    let grads = out.loss.backward();
    let bytes = std::fs::read(root().join("dpo/sigmoid_grads.safetensors")).unwrap();
    let want = SafeTensors::deserialize(&bytes).unwrap();
    let mut checked = 0;
    let mut worst = 0.0f64;
    for (site, layer) in policy.projections() {
        let ad = layer.adapter("default").unwrap();
        for (factor, param) in [("A", &ad.a), ("B", &ad.b)] {
            let g = param.val().grad(&grads).expect("gradient").transpose();
            let got: Vec<f32> = g.into_data().convert::<f32>().to_vec().unwrap();
            let t = want.tensor(&peft_key(&site, factor)).unwrap();
            let exp: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let scale = exp.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
            for (a, b) in got.iter().zip(&exp) {
                let rel = (*a as f64 - *b as f64).abs() / scale.max(1e-12);
                worst = worst.max(rel);
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 28);
    assert!(
        worst <= 1e-4,
        "worst gradient difference relative to the tensor's largest entry: {worst:e}"
    );
}
