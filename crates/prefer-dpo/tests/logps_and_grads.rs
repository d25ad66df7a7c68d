//! Log-probs, losses and LoRA gradients of a real forward pass against TRL 1.16: the tiny Llama with
//! a PEFT adapter as policy and the base (adapter off) as reference, on TRL's own batch.

use std::path::PathBuf;

use burn::{
    backend::{Autodiff, Flex, NdArray},
    tensor::{
        ElementConversion,
        backend::{AutodiffBackend, Backend},
    },
};
use prefer_dpo::{
    DpoBatch, LossConfig, Packing,
    data::{HostBatch, TokenizedPair, TruncationMode, collate, collate_kto},
    evaluate_batch,
    loss::Method,
};
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

fn host_batch(f: &Value) -> HostBatch {
    let b = &f["batch"];
    let (input_ids, shape) = rows(&b["input_ids"]);
    let (attention_mask, _) = rows(&b["attention_mask"]);
    let (completion_mask, _) = rows(&b["completion_mask"]);
    HostBatch {
        input_ids,
        attention_mask,
        completion_mask,
        shape,
        labels: vec![],
    }
}

fn batch<B: Backend>(f: &Value, device: &B::Device, packing: Packing) -> DpoBatch<B> {
    host_batch(f).to_device(device, packing)
}

/// TRL's eight KTO examples, each a completion with its KL completion.
fn kto_examples(f: &Value) -> Vec<TokenizedPair> {
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    f["other_trainers"]["kto"]["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| TokenizedPair {
            location: String::new(),
            prompt: ids(&e["prompt_ids"]),
            chosen: ids(&e["completion_ids"]),
            rejected: ids(&e["KL_completion_ids"]),
            label: e["label"].as_bool(),
        })
        .collect()
}

/// TRL's eight KTO examples as `[completions.., KL completions..]` rows.
fn kto_batch<B: Backend>(f: &Value, device: &B::Device, packing: Packing) -> DpoBatch<B> {
    let pairs = kto_examples(f);
    let refs: Vec<&TokenizedPair> = pairs.iter().collect();
    collate(&refs, 0, Some(1024), TruncationMode::KeepStart).to_device(device, packing)
}

/// The fixture's batch for `loss`'s method: TRL's DPO batch, or its KTO examples.
fn batch_for<B: Backend>(
    loss: &LossConfig,
    f: &Value,
    device: &B::Device,
    packing: Packing,
) -> DpoBatch<B> {
    match loss.method {
        Method::Kto => kto_batch(f, device, packing),
        _ => batch(f, device, packing),
    }
}

fn kto(undesirable_weight: f64) -> LossConfig {
    LossConfig {
        method: Method::Kto,
        undesirable_weight,
        ..Default::default()
    }
}

type Model<B> = LlamaModel<B, LoraLinear<B, DenseLinear<B>>>;

fn models<B: prefer_kernels::PreferBackend>(device: &B::Device) -> (Model<B>, Model<B>) {
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

/// Per-pair log-probs, loss and metrics of `packing` against TRL.
fn check_logps<B: prefer_kernels::PreferBackend>(packing: Packing) {
    let device = Default::default();
    let f = fixture();
    let (policy, reference) = models::<B>(&device);
    let out = evaluate_batch(
        &LossConfig::default(),
        &policy,
        &reference,
        &batch::<B>(&f, &device, packing),
    );
    let r = out.records().unwrap();
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
            assert!((g - w).abs() <= 1e-4, "{packing:?} {name}: {g} vs TRL {w}");
        }
    }
    assert_eq!(r.chosen_tokens, floats(&p["chosen_token_counts"]));
    let loss: f32 = out.loss.into_scalar().elem();
    let want = f["losses"]["label_smoothing_0.1"]["sigmoid"]["loss"]
        .as_f64()
        .unwrap();
    assert!(
        (loss as f64 - want).abs() <= 1e-5,
        "{packing:?} loss {loss} vs TRL {want}"
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
            "{packing:?} {name}: {g} vs TRL {w}"
        );
    }
}

/// Every LoRA factor's gradient of the loss, PEFT's key → values in PEFT's layout.
fn lora_grads<B: AutodiffBackend + prefer_kernels::PreferBackend>(
    packing: Packing,
) -> Vec<(String, Vec<f32>)> {
    lora_grads_of::<B>(&LossConfig::default(), packing)
}

/// Every LoRA factor's gradient of `loss`'s loss, PEFT's key → values in PEFT's layout.
fn lora_grads_of<B: AutodiffBackend + prefer_kernels::PreferBackend>(
    loss: &LossConfig,
    packing: Packing,
) -> Vec<(String, Vec<f32>)> {
    let device = Default::default();
    let f = fixture();
    let (policy, reference) = models::<B>(&device);
    let batch = batch_for::<B>(loss, &f, &device, packing);
    let out = evaluate_batch(loss, &policy, &reference, &batch);
    adapter_grads(&policy, out.loss)
}

/// Every LoRA factor's gradient of `loss`, PEFT's key → values in PEFT's layout.
fn adapter_grads<B: AutodiffBackend + prefer_kernels::PreferBackend>(
    policy: &Model<B>,
    loss: burn::tensor::Tensor<B, 1>,
) -> Vec<(String, Vec<f32>)> {
    let grads = loss.backward();
    let mut all = Vec::new();
    for (site, layer) in policy.projections() {
        let ad = layer.adapter("default").unwrap();
        for (factor, param) in [("A", &ad.a), ("B", &ad.b)] {
            let g = param.val().grad(&grads).expect("gradient").transpose();
            all.push((
                peft_key(&site, factor),
                g.into_data().convert::<f32>().to_vec().unwrap(),
            ));
        }
    }
    all
}

/// TRL's gradients in `dpo/{file}.safetensors`, by PEFT key.
fn trl_grads(file: &str) -> impl Fn(&str) -> Vec<f32> {
    let bytes = std::fs::read(root().join(format!("dpo/{file}.safetensors"))).unwrap();
    move |key: &str| -> Vec<f32> {
        let want = SafeTensors::deserialize(&bytes).unwrap();
        want.tensor(key)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
}

/// The largest difference between two gradient sets, relative to each tensor's largest entry.
fn worst_difference(got: &[(String, Vec<f32>)], want: &dyn Fn(&str) -> Vec<f32>) -> f64 {
    let mut worst = 0.0f64;
    for (key, g) in got {
        let exp = want(key);
        let scale = exp.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
        for (a, b) in g.iter().zip(&exp) {
            worst = worst.max((*a as f64 - *b as f64).abs() / scale.max(1e-12));
        }
    }
    worst
}

fn check_grads<B: AutodiffBackend + prefer_kernels::PreferBackend>(packing: Packing) {
    check_grads_of::<B>(&LossConfig::default(), "sigmoid_grads", packing);
}

/// `loss`'s LoRA gradients against TRL's in `dpo/{file}.safetensors`.
fn check_grads_of<B: AutodiffBackend + prefer_kernels::PreferBackend>(
    loss: &LossConfig,
    file: &str,
    packing: Packing,
) {
    let got = lora_grads_of::<B>(loss, packing);
    assert_eq!(got.len(), 28);
    let worst = worst_difference(&got, &trl_grads(file));
    assert!(
        worst <= 1e-4,
        "{packing:?} {file}: worst gradient difference from TRL relative to the tensor's largest entry: {worst:e}"
    );
}

/// The reference-free methods of the fixture's `other_trainers` runs, as prefer configures them.
fn method_runs() -> Vec<(&'static str, LossConfig)> {
    let with = |method, beta, cpo_alpha| LossConfig {
        method,
        beta,
        cpo_alpha,
        simpo_gamma: 0.5,
        ..Default::default()
    };
    vec![
        ("cpo", with(Method::Cpo, 0.1, 1.0)),
        ("simpo", with(Method::Simpo, 2.0, 0.0)),
        ("cpo_simpo", with(Method::Simpo, 2.0, 1.0)),
        ("orpo", with(Method::Orpo, 0.1, 0.0)),
    ]
}

/// CPO, SimPO (with and without CPO's NLL term) and ORPO on the real forward pass: TRL's
/// `CPOTrainer` / `ORPOTrainer` loss and logged metrics on the same batch, with no reference run.
fn check_methods<B: prefer_kernels::PreferBackend>(packing: Packing) {
    let device = Default::default();
    let f = fixture();
    let (policy, reference) = models::<B>(&device);
    let batch = batch::<B>(&f, &device, packing);
    for (name, loss_config) in method_runs() {
        loss_config.validate().unwrap();
        let trl = &f["other_trainers"][name];
        let out = evaluate_batch(&loss_config, &policy, &reference, &batch);
        let loss: f32 = out.loss.clone().into_scalar().elem();
        let want = trl["loss"].as_f64().unwrap();
        assert!(
            (loss as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{packing:?} {name}: loss {loss} vs TRL {want}"
        );
        let metrics = out
            .records()
            .unwrap()
            .metrics_of(loss_config.method, loss_config.beta);
        let mut names = vec![
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ];
        // TRL logs 0 for the NLL it does not add (SimPO's cpo_alpha = 0); prefer logs its value.
        if loss_config.cpo_alpha > 0.0 || name == "orpo" {
            names.push("nll_loss");
        }
        // Not `logits/*`: CPOTrainer and ORPOTrainer average the logits over every position of
        // the padded batch, prompt and padding included, which depends on the padding; prefer
        // reports the completion tokens' mean, as DPOTrainer does.
        if name == "orpo" {
            names.extend(["log_odds_ratio", "log_odds_chosen"]);
        }
        for m in names {
            let (g, w) = (metrics[m], trl["metrics"][m].as_f64().unwrap());
            assert!(
                (g - w).abs() <= 1e-5 + 1e-5 * w.abs(),
                "{packing:?} {name} {m}: {g} vs TRL {w}"
            );
        }
        assert!(!metrics.contains_key("kl"), "{name}: no reference, no kl");
    }
}

#[test]
fn reference_free_methods_match_trl() {
    for packing in [Packing::Padded, Packing::PaddingFree] {
        check_methods::<NdArray>(packing);
        check_methods::<Flex>(packing);
    }
}

#[test]
fn reference_free_method_gradients_match_trl() {
    for (name, loss) in method_runs() {
        for packing in [Packing::Padded, Packing::PaddingFree] {
            check_grads_of::<Autodiff<NdArray>>(&loss, &format!("{name}_grads"), packing);
            check_grads_of::<Autodiff<Flex>>(&loss, &format!("{name}_grads"), packing);
        }
    }
}

#[test]
fn log_probs_losses_and_metrics_match_trl() {
    for packing in [Packing::Padded, Packing::PaddingFree] {
        check_logps::<NdArray>(packing);
        check_logps::<Flex>(packing);
    }
}

/// LD-DPO (`ld_alpha`: each pair's tokens past its shorter completion weighted, in the policy and
/// the reference, not in the SFT term), f-DPO (`f_divergence_type`: the log-ratios through
/// `f'(exp(·))`) and WPO (`use_weighting`: each pair's loss times the policy's own probability of
/// the pair, from `log Σp²` of every completion token) on the real forward pass: TRL's loss and
/// metrics for each variant in the fixture.
fn check_variants<B: prefer_kernels::PreferBackend>(packing: Packing) {
    let device = Default::default();
    let f = fixture();
    let (policy, reference) = models::<B>(&device);
    let batch = batch::<B>(&f, &device, packing);
    let mut seen = 0;
    for (name, case) in f["extras"].as_object().unwrap() {
        let config = &case["config"];
        let train: prefer_dpo::train::TrainConfig =
            serde_json::from_value(config.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let loss_config = train.loss();
        let out = evaluate_batch(&loss_config, &policy, &reference, &batch);
        let loss: f32 = out.loss.clone().into_scalar().elem();
        let want = case["loss"].as_f64().unwrap();
        // WPO's loss is small (its weights are products of probabilities): judge it relatively.
        let tolerance = if train.use_weighting {
            1e-4 * want.abs()
        } else {
            1e-5 + 1e-5 * want.abs()
        };
        assert!(
            (loss as f64 - want).abs() <= tolerance,
            "{packing:?} {name}: loss {loss} vs TRL {want}"
        );
        let metrics = out.records().unwrap().metrics(train.beta);
        for m in [
            "logps/chosen",
            "logps/rejected",
            "rewards/chosen",
            "rewards/margins",
            "rewards/accuracies",
        ] {
            let (g, w) = (metrics[m], case["metrics"][m].as_f64().unwrap());
            assert!(
                (g - w).abs() <= 1e-4 + 1e-5 * w.abs(),
                "{packing:?} {name} {m}: {g} vs TRL {w}"
            );
        }
        seen += 1;
    }
    assert_eq!(seen, 11);
}

#[test]
fn ld_dpo_and_f_divergences_match_trl() {
    for packing in [Packing::Padded, Packing::PaddingFree] {
        check_variants::<NdArray>(packing);
        check_variants::<Flex>(packing);
    }
}

#[test]
fn lora_gradients_match_trl() {
    for packing in [Packing::Padded, Packing::PaddingFree] {
        check_grads::<Autodiff<NdArray>>(packing);
        check_grads::<Autodiff<Flex>>(packing);
    }
}

/// Padding-free batches give the padded path's per-pair log-probs and LoRA gradients.
#[test]
fn padding_free_equals_padded() {
    fn per_pair<B: prefer_kernels::PreferBackend>(packing: Packing) -> Vec<f64> {
        let device = Default::default();
        let (policy, reference) = models::<B>(&device);
        let out = evaluate_batch(
            &LossConfig::default(),
            &policy,
            &reference,
            &batch::<B>(&fixture(), &device, packing),
        );
        let r = out.records().unwrap();
        [r.chosen, r.rejected, r.ref_chosen, r.ref_rejected].concat()
    }
    fn check<B: AutodiffBackend + prefer_kernels::PreferBackend>() {
        let (padded, free) = (
            per_pair::<B>(Packing::Padded),
            per_pair::<B>(Packing::PaddingFree),
        );
        for (a, b) in padded.iter().zip(&free) {
            assert!(
                (a - b).abs() <= 1e-5 * a.abs(),
                "log-prob {a} (padded) vs {b}"
            );
        }
        let padded = lora_grads::<B>(Packing::Padded);
        let free = lora_grads::<B>(Packing::PaddingFree);
        let lookup =
            |key: &str| -> Vec<f32> { padded.iter().find(|(k, _)| k == key).unwrap().1.clone() };
        let worst = worst_difference(&free, &lookup);
        assert!(worst <= 1e-5, "gradients: padding-free vs padded {worst:e}");
    }
    check::<Autodiff<NdArray>>();
    check::<Autodiff<Flex>>();
}

/// KTO on the real forward pass: TRL's `KTOTrainer` loss (with and without class weights), its
/// KL reference point and logged metrics, and the KL completions' log-probs, on TRL's examples.
fn check_kto<B: prefer_kernels::PreferBackend>(packing: Packing) {
    let device = Default::default();
    let f = fixture();
    let k = &f["other_trainers"]["kto"];
    let (policy, reference) = models::<B>(&device);
    let batch = kto_batch::<B>(&f, &device, packing);
    let close = |what: &str, got: f64, want: f64| {
        assert!(
            (got - want).abs() <= 1e-5 + 1e-5 * want.abs(),
            "{packing:?} kto {what}: {got} vs TRL {want}"
        );
    };
    for (config, want) in [
        (kto(1.0), &k["loss"]),
        (kto(1.33), &k["weighted"]["loss"]),
        (apo_zero_unpaired(), &k["apo_zero_unpaired"]["loss"]),
    ] {
        config.validate().unwrap();
        let out = evaluate_batch(&config, &policy, &reference, &batch);
        let loss: f32 = out.loss.clone().into_scalar().elem();
        close("loss", loss as f64, want.as_f64().unwrap());
    }
    let config = kto(1.0);
    let out = evaluate_batch(&config, &policy, &reference, &batch);
    let records = out.records().unwrap();
    for (got, want) in [
        (&records.rejected, "policy_KL_logps"),
        (&records.ref_rejected, "reference_KL_logps"),
    ] {
        for (g, w) in got.iter().zip(floats(&k[want])) {
            close(want, *g, w);
        }
    }
    let metrics = records.metrics_of(Method::Kto, config.beta);
    for m in [
        "kl",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
    ] {
        close(m, metrics[m], k["metrics"][m].as_f64().unwrap());
    }
    assert_eq!(metrics["num_examples"], 8.0);
    assert!(!metrics.contains_key("rewards/accuracies"));
    // Each example's loss, averaged, is the batch's.
    let per: Vec<f64> = out
        .per_pair_loss(&config)
        .into_data()
        .convert::<f64>()
        .to_vec()
        .unwrap();
    close(
        "mean of per-example losses",
        per.iter().sum::<f64>() / 8.0,
        k["loss"].as_f64().unwrap(),
    );
}

#[test]
fn kto_loss_and_metrics_match_trl() {
    for packing in [Packing::Padded, Packing::PaddingFree] {
        check_kto::<NdArray>(packing);
        check_kto::<Flex>(packing);
    }
}

/// TRL's KTO examples as the trainer batches them: the completions, and the KL completions apart.
fn kto_split<B: Backend>(
    f: &Value,
    device: &B::Device,
    packing: Packing,
) -> (DpoBatch<B>, DpoBatch<B>) {
    let pairs = kto_examples(f);
    let refs: Vec<&TokenizedPair> = pairs.iter().collect();
    let (batch, kl) = collate_kto(&refs, 0, Some(1024), TruncationMode::KeepStart);
    (
        batch.to_device(device, packing),
        kl.to_device(device, packing),
    )
}

/// The trainer's KTO step — the completions with gradients, the KL completions and the reference
/// apart on the inner backend — gives TRL's loss, `kl` and LoRA gradients.
#[test]
fn kto_training_step_matches_trl() {
    use prefer_dpo::train::{DpoInput, DpoPolicy};
    type AB = Autodiff<NdArray>;
    for packing in [Packing::Padded, Packing::PaddingFree] {
        let device = Default::default();
        let f = fixture();
        let (model, _) = models::<AB>(&device);
        let (batch, kl) = kto_split::<AB>(&f, &device, packing);
        let config = kto(1.0);
        // No reference adapter: the reference is the base with the adapter off, as TRL's.
        let policy = DpoPolicy {
            model,
            loss: config.clone(),
            reference: None,
        };
        let input = DpoInput {
            batch,
            kl_batch: Some(kl),
            ref_logps: None,
        };
        let out = policy.train_step(input).unwrap();
        let k = &f["other_trainers"]["kto"];
        let want = k["loss"].as_f64().unwrap();
        let loss = out.item.loss;
        assert!(
            (loss - want).abs() <= 1e-5,
            "{packing:?}: {loss} vs TRL {want}"
        );
        let metrics = out.item.records.metrics_of(Method::Kto, config.beta);
        let want_kl = k["metrics"]["kl"].as_f64().unwrap();
        let kl = metrics["kl"];
        assert!(
            (kl - want_kl).abs() <= 1e-5,
            "{packing:?}: kl {kl} vs TRL {want_kl}"
        );
        let mut got = Vec::new();
        for (site, layer) in policy.model.projections() {
            let ad = layer.adapter("default").unwrap();
            for (factor, param) in [("A", &ad.a), ("B", &ad.b)] {
                let g = out.grads.get::<NdArray, 2>(param.id).expect("gradient");
                let g = g.transpose().into_data().convert::<f32>().to_vec().unwrap();
                got.push((peft_key(&site, factor), g));
            }
        }
        assert_eq!(got.len(), 28);
        let worst = worst_difference(&got, &trl_grads("kto_grads"));
        assert!(
            worst <= 1e-4,
            "{packing:?}: worst gradient difference {worst:e}"
        );
    }
}

fn apo_zero_unpaired() -> LossConfig {
    LossConfig {
        loss_types: vec![prefer_dpo::loss::LossType::ApoZeroUnpaired],
        ..kto(1.0)
    }
}

#[test]
fn kto_gradients_match_trl() {
    for packing in [Packing::Padded, Packing::PaddingFree] {
        check_grads_of::<Autodiff<NdArray>>(&kto(1.0), "kto_grads", packing);
        check_grads_of::<Autodiff<Flex>>(&kto(1.0), "kto_grads", packing);
        let apo = apo_zero_unpaired();
        check_grads_of::<Autodiff<NdArray>>(&apo, "kto_apo_zero_unpaired_grads", packing);
        check_grads_of::<Autodiff<Flex>>(&apo, "kto_apo_zero_unpaired_grads", packing);
    }
}

/// A step's loss, LoRA gradients by PEFT key, and reference log-probs `[chosen.., rejected..]`.
type StepResult = (f64, Vec<(String, Vec<f32>)>, Vec<f64>);

/// The trainer's step on the fixture's DPO batch, its reference the base with the adapter off
/// (run beside the policy, or `precomputed` from a first step's records).
fn dpo_step<B: AutodiffBackend + prefer_kernels::PreferBackend>(
    model: Model<B>,
    packing: Packing,
    precomputed: Option<&[f64]>,
) -> StepResult
where
    B::InnerBackend: prefer_kernels::PreferBackend,
{
    use prefer_dpo::train::{DpoInput, DpoPolicy};
    let device = Default::default();
    let policy = DpoPolicy {
        model,
        loss: LossConfig::default(),
        reference: None,
    };
    let ref_logps = precomputed.map(|r| {
        burn::tensor::Tensor::from_data(
            burn::tensor::TensorData::from(r.to_vec().as_slice()),
            &device,
        )
    });
    let input = DpoInput {
        batch: batch::<B>(&fixture(), &device, packing),
        kl_batch: None,
        ref_logps,
    };
    let out = policy.train_step(input).unwrap();
    let mut grads = Vec::new();
    for (site, layer) in policy.model.projections() {
        let ad = layer.adapter("default").unwrap();
        for (factor, param) in [("A", &ad.a), ("B", &ad.b)] {
            let g = out
                .grads
                .get::<B::InnerBackend, 2>(param.id)
                .expect("gradient");
            let g = g.transpose().into_data().convert::<f32>().to_vec().unwrap();
            grads.push((peft_key(&site, factor), g));
        }
    }
    let r = &out.item.records;
    let refs = [r.ref_chosen.clone(), r.ref_rejected.clone()].concat();
    (out.item.loss, grads, refs)
}

/// Activation checkpointing recomputes each decoder layer in the backward pass: the training
/// step's loss and LoRA gradients equal those of the step that keeps every activation, padded and
/// padding-free, with the reference run beside the policy or precomputed.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    fn check<B: AutodiffBackend + prefer_kernels::PreferBackend>()
    where
        B::InnerBackend: prefer_kernels::PreferBackend,
    {
        let device = Default::default();
        for packing in [Packing::Padded, Packing::PaddingFree] {
            let (plain, _) = models::<B>(&device);
            let mut checkpointed = plain.clone();
            checkpointed.set_gradient_checkpointing(true);
            let (loss, grads, refs) = dpo_step(plain, packing, None);
            assert_eq!(grads.len(), 28);
            for precomputed in [None, Some(refs.as_slice())] {
                let (c_loss, c_grads, _) = dpo_step(checkpointed.clone(), packing, precomputed);
                assert!(
                    (c_loss - loss).abs() <= 1e-6 * loss.abs(),
                    "{packing:?}: loss {c_loss} checkpointed vs {loss}"
                );
                let lookup = |key: &str| -> Vec<f32> {
                    grads.iter().find(|(k, _)| k == key).unwrap().1.clone()
                };
                assert_eq!(c_grads.len(), 28, "every adapter factor has a gradient");
                let worst = worst_difference(&c_grads, &lookup);
                assert!(
                    worst <= 1e-6,
                    "{packing:?} precomputed {}: checkpointed gradients differ by {worst:e}",
                    precomputed.is_some()
                );
            }
        }
    }
    check::<Autodiff<NdArray>>();
    check::<Autodiff<Flex>>();
}

/// With adapter dropout on, a checkpointed layer draws the same masks when it is recomputed as in
/// the forward pass: the gradient is the derivative of the loss that was computed. Checked against
/// a central difference of that loss along the gradient, each evaluation under the same seed.
#[test]
fn gradient_checkpointing_replays_dropout() {
    type AB = Autodiff<NdArray>;
    let device = Default::default();
    let (mut model, _) = models::<AB>(&device);
    for (_, layer) in model.projections_mut() {
        layer.dropout.prob = 0.5;
    }
    model.set_gradient_checkpointing(true);
    let step = |model: Model<AB>| {
        <AB as Backend>::seed(&device, 7);
        dpo_step(model, Packing::PaddingFree, None)
    };
    let (_, grads, _) = step(model.clone());
    let norm = grads
        .iter()
        .flat_map(|(_, g)| g.iter())
        .map(|v| (*v as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    // Moves every factor by `t` along the unit gradient.
    let moved = |t: f64| {
        let mut m = model.clone();
        for (site, layer) in m.projections_mut() {
            let ad = &mut layer.adapters[0];
            for (factor, param) in [("A", &mut ad.a), ("B", &mut ad.b)] {
                let g = &grads
                    .iter()
                    .find(|(k, _)| *k == peft_key(&site, factor))
                    .unwrap()
                    .1;
                let [rows, cols] = param.dims();
                // PEFT's layout is the transpose of the stored factor.
                let g = burn::tensor::Tensor::<AB, 2>::from_data(
                    burn::tensor::TensorData::new(g.clone(), [cols, rows]),
                    &device,
                )
                .transpose();
                *param = param
                    .clone()
                    .map(|p| (p + g * (t / norm)).detach().require_grad());
            }
        }
        step(m).0
    };
    let eps = 1e-2;
    let slope = (moved(eps) - moved(-eps)) / (2.0 * eps);
    assert!(
        (slope - norm).abs() <= 2e-2 * norm,
        "directional derivative {slope} vs gradient norm {norm}"
    );
}

/// Each completion token's log-prob, row by row, from `[rows, T − 1]` values and their mask.
fn completion_tokens(
    values: burn::tensor::Tensor<Flex, 2>,
    mask: burn::tensor::Tensor<Flex, 2>,
) -> Vec<Vec<f64>> {
    let [rows, t] = values.dims();
    let v: Vec<f64> = values.into_data().convert::<f64>().to_vec().unwrap();
    let m: Vec<f64> = mask.into_data().convert::<f64>().to_vec().unwrap();
    (0..rows)
        .map(|r| {
            (0..t)
                .filter(|&j| m[r * t + j] > 0.0)
                .map(|j| v[r * t + j])
                .collect()
        })
        .collect()
}

/// The largest absolute difference between two nested lists of the same shape.
fn worst_abs(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f64::max)
}

fn nested(x: &Value) -> Vec<Vec<f64>> {
    x.as_array().unwrap().iter().map(floats).collect()
}

/// Half-precision compute (`bf16`, `fp16`) on burn-flex against TRL run in the same type on the
/// CPU (`half.json`). Rounding to 8 (bf16) or 11 (fp16) significant bits makes every
/// implementation land somewhere else, so prefer's numbers are judged by their distance to the
/// float32 ones (TRL's, `losses.json`): per-token log-probs, per-row sums of policy and
/// reference, the loss and the LoRA gradients must be at most twice as far from float32 as TRL's
/// own half-precision numbers are — and farther than float32 rounding (1e-4), which shows the
/// model did compute in half precision.
#[test]
fn half_precision_is_as_close_to_float32_as_trls() {
    use burn::tensor::FloatDType;
    type AB = Autodiff<Flex>;
    let f = fixture();
    let half: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("dpo/half.json")).unwrap())
            .unwrap();
    let pp = &f["per_pair"];
    let f32_tokens = [
        nested(&pp["policy_chosen_token_logps"]),
        nested(&pp["policy_rejected_token_logps"]),
    ]
    .concat();
    let f32_sums = [
        floats(&pp["policy_chosen_logps"]),
        floats(&pp["policy_rejected_logps"]),
        floats(&pp["reference_chosen_logps"]),
        floats(&pp["reference_rejected_logps"]),
    ];
    let f32_loss = f["sigmoid_grads"]["loss"].as_f64().unwrap();
    let f32_grads = trl_grads("sigmoid_grads");
    for (name, dtype) in [("bf16", FloatDType::BF16), ("fp16", FloatDType::F16)] {
        let t = &half[name];
        let device = Default::default();
        let (mut model, _) = models::<AB>(&device);
        model.set_compute_dtype(dtype);
        // Per-token log-probs of the policy (forward only, on the inner backend).
        let inner = burn::module::AutodiffModule::valid(&model);
        let rows = batch::<Flex>(&f, &device, Packing::PaddingFree);
        let logps = prefer_dpo::logps::sequence_logps(&inner, &rows);
        let tokens = completion_tokens(logps.token_logps, logps.mask);
        let (trl_tokens, ours) = (
            worst_abs(&nested(&t["policy_token_logps"]), &f32_tokens),
            worst_abs(&tokens, &f32_tokens),
        );
        assert!(
            ours <= 2.0 * trl_tokens && ours > 1e-4,
            "{name}: per-token log-probs {ours:e} from float32 (TRL's {name}: {trl_tokens:e})"
        );
        // The training step: loss, per-row sums and LoRA gradients.
        let (loss, grads, _) = dpo_step(model, Packing::PaddingFree, None);
        let records = {
            let (mut m, _) = models::<AB>(&device);
            m.set_compute_dtype(dtype);
            let policy = prefer_dpo::train::DpoPolicy {
                model: m,
                loss: LossConfig::default(),
                reference: None,
            };
            let input = prefer_dpo::train::DpoInput {
                batch: batch::<AB>(&f, &device, Packing::PaddingFree),
                kl_batch: None,
                ref_logps: None,
            };
            policy.infer(input).unwrap().records
        };
        let sums = [
            records.chosen,
            records.rejected,
            records.ref_chosen,
            records.ref_rejected,
        ];
        let trl_sums = [floats(&t["policy_logps"]), floats(&t["reference_logps"])].concat();
        let want: Vec<f64> = f32_sums.concat();
        let ours_sums = worst_abs(&[sums.concat()], std::slice::from_ref(&want));
        let trl_sums = worst_abs(&[trl_sums], &[want]);
        assert!(
            ours_sums <= 2.0 * trl_sums,
            "{name}: sequence log-probs {ours_sums:e} from float32 (TRL's {name}: {trl_sums:e})"
        );
        let (ours_loss, trl_loss) = (
            (loss - f32_loss).abs(),
            (t["loss"].as_f64().unwrap() - f32_loss).abs(),
        );
        assert!(
            ours_loss <= 2.0 * trl_loss,
            "{name}: loss {loss} vs float32 {f32_loss} (TRL's {name}: {})",
            t["loss"]
        );
        let file = format!("{name}_grads");
        let trl_half = trl_grads(&file);
        let keys: Vec<(String, Vec<f32>)> = grads
            .iter()
            .map(|(k, _)| (k.clone(), trl_half(k)))
            .collect();
        let (ours_grads, trl_grads_off) = (
            worst_difference(&grads, &f32_grads),
            worst_difference(&keys, &f32_grads),
        );
        assert!(
            ours_grads <= 2.0 * trl_grads_off,
            "{name}: LoRA gradients {ours_grads:e} from float32 (TRL's {name}: {trl_grads_off:e})"
        );
        println!(
            "{name}: from float32, prefer vs TRL — tokens {ours:.3e} / {trl_tokens:.3e}, sums \
             {ours_sums:.3e} / {trl_sums:.3e}, loss {ours_loss:.3e} / {trl_loss:.3e}, gradients \
             {ours_grads:.3e} / {trl_grads_off:.3e}"
        );
    }
}
