//! LoRA behaviour that needs no Python reference: a fresh adapter changes nothing, training moves
//! only the adapter, adapters switch and snapshot without copying the base, and PEFT files round-trip.

use burn::{
    backend::{Autodiff, NdArray},
    module::{AutodiffModule, Module},
    optim::{AdamWConfig, GradientsParams, Optimizer},
    tensor::{Int, Tensor, TensorData, backend::Backend},
};
use prefer_llama::{DenseFactory, LlamaConfig, LlamaModel, MemoryWeights, Projection};
use prefer_lora::{
    LoraConfig, LoraFactory, LoraModel, load_peft, save_peft, set_active_adapter, snapshot_adapter,
};

type B = NdArray;
type AD = Autodiff<NdArray>;

fn config() -> LlamaConfig {
    LlamaConfig {
        max_position_embeddings: 64,
        ..LlamaConfig::plain(50, 32, 48, 2, 4, 2)
    }
}

fn lora_config() -> LoraConfig {
    LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        ..Default::default()
    }
}

fn models<Bk: prefer_kernels::PreferBackend>(
    device: &Bk::Device,
) -> (
    LlamaModel<Bk, prefer_llama::DenseLinear<Bk>>,
    LoraModel<Bk, prefer_llama::DenseLinear<Bk>>,
) {
    models_with(lora_config(), device)
}

/// The dense model and the same weights with a fresh adapter of `lora`.
fn models_with<Bk: prefer_kernels::PreferBackend>(
    lora: LoraConfig,
    device: &Bk::Device,
) -> (
    LlamaModel<Bk, prefer_llama::DenseLinear<Bk>>,
    LoraModel<Bk, prefer_llama::DenseLinear<Bk>>,
) {
    let c = config();
    let dense = LlamaModel::from_weights(
        &c,
        &mut MemoryWeights::random(&c, 0.3, 7),
        &DenseFactory,
        device,
    )
    .unwrap();
    let factory = LoraFactory {
        inner: DenseFactory,
        config: lora,
        adapter_name: "default".into(),
    };
    let lora =
        LlamaModel::from_weights(&c, &mut MemoryWeights::random(&c, 0.3, 7), &factory, device)
            .unwrap();
    (dense, lora)
}

fn tokens<Bk: Backend>(device: &Bk::Device) -> Tensor<Bk, 2, Int> {
    let ids: Vec<i64> = (0..2 * 9).map(|i| (i * 17 % 50) as i64).collect();
    Tensor::from_data(TensorData::new(ids, [2, 9]), device)
}

fn values<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

#[test]
fn fresh_adapter_leaves_the_model_unchanged() {
    let device = Default::default();
    let (dense, lora) = models::<B>(&device);
    assert_eq!(
        values(dense.forward(tokens(&device), None)),
        values(lora.forward(tokens(&device), None))
    );
}

/// A fresh DoRA adapter starts at the adapted weight's row norms, so the model is the dense one
/// (to the bit: the scale is a norm divided by itself); a step moves the magnitudes.
#[test]
fn fresh_dora_adapter_leaves_the_model_unchanged_and_trains_its_magnitude() {
    let device = Default::default();
    let dora = LoraConfig {
        use_dora: true,
        ..lora_config()
    };
    let (dense, mut model) = models_with::<AD>(dora, &device);
    assert_eq!(
        values(dense.forward(tokens(&device), None)),
        values(model.forward(tokens(&device), None))
    );
    let magnitude = |m: &LoraModel<AD, prefer_llama::DenseLinear<AD>>| {
        let q = &m.layers[0].self_attn.q_proj;
        values(q.adapters[0].dora.as_ref().unwrap().magnitude.val())
    };
    let before = magnitude(&model);
    let loss = model.forward(tokens(&device), None).powi_scalar(2).mean();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let mut optim = AdamWConfig::new().init();
    model = optim.step(1e-2, model, grads);
    let after = magnitude(&model);
    assert!(
        before.iter().zip(&after).all(|(b, a)| b != a),
        "every magnitude moves"
    );
}

#[test]
fn training_moves_only_the_adapter_and_the_base_stays_bit_identical() {
    let device = Default::default();
    let (_, mut model) = models::<AD>(&device);
    // Give B non-zero values so A receives gradients too.
    for (_, layer) in model.projections_mut() {
        if let Some(i) = layer.active {
            let b = layer.adapters[i].b.val();
            layer.adapters[i].b = burn::module::Param::from_tensor(
                b.random_like(burn::tensor::Distribution::Normal(0.0, 0.1)),
            );
        }
    }
    let base_before: Vec<Vec<f32>> = model
        .projections()
        .iter()
        .map(|(_, l)| values(l.base.weight.val()))
        .collect();
    let embed_before = values(model.embed_tokens.weight.val());
    let a_before = values(model.layers[0].self_attn.q_proj.adapters[0].a.val());
    let b_before = values(model.layers[0].self_attn.q_proj.adapters[0].b.val());

    let mut optim = AdamWConfig::new().with_weight_decay(0.01).init();
    for _ in 0..3 {
        let loss = model.forward(tokens(&device), None).powi_scalar(2).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    let base_after: Vec<Vec<f32>> = model
        .projections()
        .iter()
        .map(|(_, l)| values(l.base.weight.val()))
        .collect();
    assert!(base_before == base_after, "base weights changed");
    assert!(
        embed_before == values(model.embed_tokens.weight.val()),
        "embedding changed"
    );
    assert_ne!(
        a_before,
        values(model.layers[0].self_attn.q_proj.adapters[0].a.val())
    );
    assert_ne!(
        b_before,
        values(model.layers[0].self_attn.q_proj.adapters[0].b.val())
    );
    // The inner (validation) model sees the same adapters.
    let inner = model.valid();
    assert_eq!(inner.layers[0].self_attn.q_proj.adapters.len(), 1);
}

#[test]
fn adapters_switch_off_and_snapshot_without_copying_the_base() {
    let device = Default::default();
    let (dense, mut model) = models::<B>(&device);
    for (_, layer) in model.projections_mut() {
        if let Some(i) = layer.active {
            let b = layer.adapters[i].b.val();
            layer.adapters[i].b = burn::module::Param::from_tensor(
                b.random_like(burn::tensor::Distribution::Normal(0.0, 0.1)),
            );
        }
    }
    let with = values(model.forward(tokens(&device), None));
    snapshot_adapter(&mut model, "default", "reference");
    assert_eq!(
        values(model.forward(tokens(&device), None)),
        with,
        "snapshot leaves the policy active"
    );
    set_active_adapter(&mut model, Some("reference"));
    assert_eq!(
        values(model.forward(tokens(&device), None)),
        with,
        "the reference equals the snapshot"
    );
    set_active_adapter(&mut model, None);
    assert_eq!(
        values(model.forward(tokens(&device), None)),
        values(dense.forward(tokens(&device), None))
    );
    // Parameters: one base, two adapters.
    let n_base: usize = dense.num_params();
    let adapter: usize = model
        .projections()
        .iter()
        .map(|(_, l)| {
            l.adapters[0].a.val().dims().iter().product::<usize>()
                + l.adapters[0].b.val().dims().iter().product::<usize>()
        })
        .sum();
    assert_eq!(model.num_params(), n_base + 2 * adapter);
}

#[test]
fn peft_files_round_trip_and_reject_another_base() {
    let device = Default::default();
    let (_, mut model) = models::<B>(&device);
    for (_, layer) in model.projections_mut() {
        if let Some(i) = layer.active {
            let b = layer.adapters[i].b.val();
            layer.adapters[i].b = burn::module::Param::from_tensor(
                b.random_like(burn::tensor::Distribution::Normal(0.0, 0.1)),
            );
        }
    }
    let dir = std::env::temp_dir().join(format!("prefer-lora-rt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = lora_config();
    save_peft(&model, "default", &cfg, Some("tiny"), &dir).unwrap();
    let expected = values(model.forward(tokens(&device), None));

    let (_, mut fresh) = models::<B>(&device);
    let loaded = load_peft(&mut fresh, &dir, "default").unwrap();
    assert_eq!(loaded.r, 4);
    assert_eq!(loaded.target_modules, Projection::ALL.to_vec());
    assert_eq!(values(fresh.forward(tokens(&device), None)), expected);

    // A base with a different MLP width: the error names the tensor and both shapes.
    let mut c = config();
    c.intermediate_size = 40;
    let factory = LoraFactory {
        inner: DenseFactory,
        config: lora_config(),
        adapter_name: "x".into(),
    };
    let mut other: LoraModel<B, _> = LlamaModel::from_weights(
        &c,
        &mut MemoryWeights::random(&c, 0.3, 7),
        &factory,
        &device,
    )
    .unwrap();
    let err = load_peft(&mut other, &dir, "default")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tensor `base_model.model.model.layers.0.mlp.")
            && err.contains("but the model needs"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn adapter_files_that_disagree_with_their_config_are_refused() {
    let device = Default::default();
    let (_, model) = models::<B>(&device);
    let dir = std::env::temp_dir().join(format!("prefer-lora-disagree-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // The file holds all seven projections of both layers.
    save_peft(&model, "default", &lora_config(), None, &dir).unwrap();
    let write_config = |c: &LoraConfig| {
        std::fs::write(
            dir.join("adapter_config.json"),
            serde_json::to_string(&c.to_peft_json(None)).unwrap(),
        )
        .unwrap()
    };

    // target_modules lists q and v only: the k/o/gate/up/down tensors are named, not dropped.
    write_config(&LoraConfig {
        target_modules: vec![Projection::Q, Projection::V],
        ..lora_config()
    });
    let (_, mut fresh) = models::<B>(&device);
    let err = load_peft(&mut fresh, &dir, "loaded")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "20 tensors match no module of adapter_config.json's target_modules [q_proj, v_proj]"
        ) && err.contains("`base_model.model.model.layers.0.mlp.down_proj.lora_A.weight`")
            && err.contains("and 16 more"),
        "{err}"
    );
    assert!(
        fresh
            .projections()
            .iter()
            .all(|(_, l)| l.adapter("loaded").is_none()),
        "nothing is loaded from a refused adapter"
    );

    // r disagrees with the tensors' rank.
    write_config(&LoraConfig {
        r: 2,
        ..lora_config()
    });
    let err = load_peft(&mut fresh, &dir, "loaded")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("has shape [4, 48], but adapter_config.json's r = 2 needs [2, 48]"),
        "{err}"
    );

    // Writing: the config must describe the adapter's tensors.
    let err = save_peft(
        &model,
        "default",
        &LoraConfig {
            r: 2,
            ..lora_config()
        },
        None,
        &dir,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("has rank 4"), "{err}");
    let err = save_peft(
        &model,
        "default",
        &LoraConfig {
            target_modules: vec![Projection::Q],
            ..lora_config()
        },
        None,
        &dir,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("target_modules [\"q_proj\"]"), "{err}");

    // target_modules lists a projection the file holds no tensor for.
    let qv = LoraConfig {
        target_modules: vec![Projection::Q, Projection::V],
        ..lora_config()
    };
    let c = config();
    let factory = LoraFactory {
        inner: DenseFactory,
        config: qv.clone(),
        adapter_name: "default".into(),
    };
    let only_qv: LoraModel<B, _> = LlamaModel::from_weights(
        &c,
        &mut MemoryWeights::random(&c, 0.3, 7),
        &factory,
        &device,
    )
    .unwrap();
    save_peft(&only_qv, "default", &qv, None, &dir).unwrap();
    write_config(&LoraConfig {
        target_modules: vec![Projection::Q, Projection::K, Projection::V],
        ..lora_config()
    });
    let err = load_peft(&mut fresh, &dir, "loaded")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("target_modules lists `k_proj` but the file holds no tensor for it"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn training_over_an_nf4_base_leaves_codes_and_scales_bit_identical() {
    use prefer_quant::Nf4Factory;
    let device = Default::default();
    let c = config();
    let factory = LoraFactory {
        inner: Nf4Factory::default(),
        config: lora_config(),
        adapter_name: "default".into(),
    };
    let mut model: Nf4Model = LlamaModel::from_weights(
        &c,
        &mut MemoryWeights::random(&c, 0.3, 7),
        &factory,
        &device,
    )
    .unwrap();
    for (_, layer) in model.projections_mut() {
        if let Some(i) = layer.active {
            let b = layer.adapters[i].b.val();
            layer.adapters[i].b = burn::module::Param::from_tensor(
                b.random_like(burn::tensor::Distribution::Normal(0.0, 0.1)),
            );
        }
    }
    type Nf4Model = LlamaModel<AD, prefer_lora::LoraLinear<AD, prefer_quant::Nf4Linear<AD>>>;
    let frozen = |m: &Nf4Model| -> Vec<prefer_quant::Nf4Weight> {
        m.projections()
            .iter()
            .map(|(_, l)| l.base.to_weight().unwrap())
            .collect()
    };
    let before = frozen(&model);
    let a_before = values(model.layers[1].mlp.down_proj.adapters[0].a.val());
    let mut optim = AdamWConfig::new().with_weight_decay(0.01).init();
    for _ in 0..2 {
        let loss = model.forward(tokens(&device), None).powi_scalar(2).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    assert!(before == frozen(&model), "NF4 codes or scales changed");
    assert_ne!(
        a_before,
        values(model.layers[1].mlp.down_proj.adapters[0].a.val())
    );
}

#[test]
fn fresh_a_is_kaiming_uniform_and_b_is_zero() {
    let device = Default::default();
    let (_, model) = models::<B>(&device);
    for (site, layer) in model.projections() {
        let ad = &layer.adapters[0];
        let [d_in, r] = ad.a.val().dims();
        assert_eq!(r, 4);
        let bound = 1.0 / (d_in as f32).sqrt();
        let a = values(ad.a.val());
        assert!(
            a.iter().all(|x| x.abs() <= bound),
            "{site:?}: A outside ±1/√in"
        );
        assert!(
            a.iter().any(|x| x.abs() > bound / 2.0),
            "{site:?}: A not spread over its range"
        );
        assert!(
            values(ad.b.val()).iter().all(|x| *x == 0.0),
            "{site:?}: B must start at zero"
        );
        assert_eq!(ad.scaling, 2.0);
    }
}
