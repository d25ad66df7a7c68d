//! DoRA against PEFT beyond the forward pass (`quant_interop` checks the log-probs, `merge` the
//! merged checkpoint): the gradients of the log-probs with respect to the LoRA factors and the
//! magnitude vectors, with the row norm held constant as PEFT holds it. Fixture from
//! `tools/make_lora_fixtures.py` (PEFT in float64).

mod common;

use burn::{
    backend::{Autodiff, NdArray},
    tensor::{Int, Tensor, TensorData, activation::log_softmax},
};
use common::*;
use prefer::{
    llama::{Checkpoint, DenseFactory, DenseLinear, LinearSite, Projection},
    lora::{LoraConfig, LoraFactory, LoraModel, load_peft, peft_key, peft_magnitude_key},
};

type AD = Autodiff<NdArray>;

/// The sum over `rows` of every next-token log-prob (differentiable).
fn summed_logprobs(model: &LoraModel<AD, DenseLinear<AD>>, rows: &[Vec<u32>]) -> Tensor<AD, 1> {
    let device = Default::default();
    rows.iter()
        .map(|row| {
            let n = row.len();
            let ids: Vec<i64> = row.iter().map(|&t| t as i64).collect();
            let input =
                Tensor::<AD, 2, Int>::from_data(TensorData::new(ids.clone(), [1, n]), &device);
            let next = Tensor::<AD, 3, Int>::from_data(
                TensorData::new(ids[1..].to_vec(), [1, n - 1, 1]),
                &device,
            );
            let lp = log_softmax(model.forward(input, None), 2).narrow(1, 0, n - 1);
            lp.gather(2, next).sum()
        })
        .reduce(|a, b| a + b)
        .expect("at least one row")
}

fn host<const D: usize>(t: Tensor<NdArray, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().unwrap()
}

/// Worst `|got − want|` relative to the largest `|want|` of the tensor.
fn relative_error(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / scale)
        .fold(0.0, f64::max)
}

#[test]
fn dora_gradients_match_peft() {
    let device = Default::default();
    let bare = LoraFactory {
        inner: DenseFactory,
        config: LoraConfig {
            target_modules: vec![],
            ..Default::default()
        },
        adapter_name: "unused".into(),
    };
    let mut model: LoraModel<AD, DenseLinear<AD>> = Checkpoint::open(&fixture("llama/gqa_f32"))
        .unwrap()
        .build(&bare, &device)
        .unwrap();
    load_peft(&mut model, &fixture("lora/peft_dora"), "default").unwrap();
    let expected = json("lora/peft_dora/expected.json");
    let rows: Vec<Vec<u32>> = expected["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let grads = summed_logprobs(&model, &rows).backward();

    let mut checked = 0;
    for site in [
        LinearSite {
            layer: 0,
            projection: Projection::Q,
        },
        LinearSite {
            layer: 1,
            projection: Projection::Down,
        },
    ] {
        let layer = model
            .projections()
            .into_iter()
            .find(|(s, _)| *s == site)
            .map(|(_, l)| l)
            .unwrap();
        let ad = layer.adapter("default").unwrap();
        let dora = ad.dora.as_ref().expect("a DoRA adapter");
        // prefer stores A `[in, r]` and B `[r, out]`; PEFT the transposes.
        let got = [
            (
                peft_key(&site, "A"),
                host(ad.a.grad(&grads).unwrap().transpose()),
            ),
            (
                peft_key(&site, "B"),
                host(ad.b.grad(&grads).unwrap().transpose()),
            ),
            (
                peft_magnitude_key(&site),
                host(dora.magnitude.grad(&grads).unwrap()),
            ),
        ];
        for (key, got) in got {
            let want = floats(&expected["grads"][&key]);
            let err = relative_error(&got, &want);
            // float32 against PEFT's float64: sums over three sequences of 64-wide rows.
            assert!(
                err <= 1e-4,
                "{key}: worst gradient error {err:e} of the largest"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 6);
    // The base is frozen: no gradient reaches it.
    let q = &model.layers[0].self_attn.q_proj;
    assert!(q.base.weight.grad(&grads).is_none());
}
