//! Save a LoRA adapter that PEFT can load: load a model with a fresh adapter on every projection,
//! give it non-zero weights (as training would), write it in PEFT's format, and print the adapted
//! model's per-token log-probs for a few sequences as JSON (used by `tools/check_interop.py`).
//! With `--dora` the adapter is a DoRA one, its magnitudes moved off their initial row norms too.
//!
//! ```sh
//! cargo run --example export_adapter -- tests/fixtures/llama/gqa_f32 /tmp/prefer-adapter [--dora]
//! ```

use burn::{
    backend::NdArray,
    module::Param,
    tensor::{Distribution, Int, Tensor, TensorData, activation::log_softmax},
};
use prefer::{
    llama::{Checkpoint, DenseFactory, LlamaModel},
    lora::{LoraConfig, LoraFactory, save_peft},
};

type B = NdArray;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(model_path), Some(out)) = (args.next(), args.next()) else {
        return Err("usage: export_adapter MODEL OUT_DIR [--dora]".into());
    };
    let use_dora = match args.next().as_deref() {
        None => false,
        Some("--dora") => true,
        Some(other) => return Err(format!("unexpected argument `{other}`").into()),
    };
    <B as burn::tensor::backend::Backend>::seed(&Default::default(), 7);
    let device = Default::default();
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        use_dora,
        ..Default::default()
    };
    let factory = LoraFactory {
        inner: DenseFactory,
        config: config.clone(),
        adapter_name: "default".into(),
    };
    let mut model: LlamaModel<B, _> =
        Checkpoint::open(model_path.as_ref())?.build(&factory, &device)?;
    for (_, layer) in model.projections_mut() {
        for ad in &mut layer.adapters {
            ad.b = Param::from_tensor(ad.b.val().random_like(Distribution::Normal(0.0, 0.05)));
            if let Some(dora) = &mut ad.dora {
                let m = dora.magnitude.val();
                let factor = m.random_like(Distribution::Uniform(0.9, 1.1));
                dora.magnitude = Param::from_tensor(m * factor);
            }
        }
    }
    save_peft(&model, "default", &config, Some(&model_path), out.as_ref())?;

    let sequences: Vec<Vec<i64>> = vec![
        (3..19).map(|i| i * 7 % 390 + 3).collect(),
        (5..14).map(|i| i * 13 % 390 + 3).collect(),
    ];
    let mut all = Vec::new();
    for seq in &sequences {
        let t = seq.len();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(seq.clone(), [1, t]), &device);
        let logp = log_softmax(model.forward(ids.clone(), None), 2);
        let picked = logp
            .slice([0..1, 0..t - 1])
            .gather(2, ids.slice([0..1, 1..t]).unsqueeze_dim::<3>(2));
        let v: Vec<f32> = picked
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| format!("{e:?}"))?;
        all.push(v);
    }
    println!(
        "{}",
        serde_json::json!({"sequences": sequences, "logprobs": all})
    );
    Ok(())
}
