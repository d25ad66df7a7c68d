//! Shared helpers of the integration tests: fixtures, tolerances, backends.
#![allow(dead_code)]

use std::path::PathBuf;

use burn::tensor::{Int, Tensor, TensorData, activation::log_softmax};
use prefer::llama::{LinearLayer, LlamaModel};
use serde_json::Value;

/// `tests/fixtures/...`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// Parses a JSON fixture.
pub fn json(rel: &str) -> Value {
    let path = fixture(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array of floats")
        .iter()
        .map(|x| x.as_f64().expect("float"))
        .collect()
}

/// Asserts `|a − b| ≤ rel·|b| + abs` element-wise, reporting the worst offender.
pub fn assert_close(what: &str, actual: &[f64], expected: &[f64], rel: f64, abs: f64) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let mut worst = (0.0f64, 0usize);
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        let excess = (a - e).abs() - (rel * e.abs() + abs);
        if excess > worst.0 || !a.is_finite() {
            worst = (excess.max(f64::MAX * f64::from(!a.is_finite() as u8)), i);
        }
    }
    let i = worst.1;
    assert!(
        worst.0 <= 0.0,
        "{what}: element {i}: got {}, expected {} (|diff| {:.3e})",
        actual[i],
        expected[i],
        (actual[i] - expected[i]).abs()
    );
}

/// Per-token log-probabilities `log p(x[t+1] | x[..=t])` of a right-padded batch, `lens[i]` real tokens per row.
pub fn token_logprobs<B: prefer::kernels::LayerBackend, L: LinearLayer<B>>(
    model: &LlamaModel<B, L>,
    rows: &[Vec<u32>],
    pad: bool,
    device: &B::Device,
) -> Vec<Vec<f64>> {
    let t = rows.iter().map(Vec::len).max().unwrap_or(0);
    let b = rows.len();
    let mut ids = Vec::with_capacity(b * t);
    let mut mask = Vec::with_capacity(b * t);
    for r in rows {
        for j in 0..t {
            ids.push(*r.get(j).unwrap_or(&0) as i64);
            mask.push((j < r.len()) as i64);
        }
    }
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, t]), device);
    let mask = pad.then(|| Tensor::<B, 2, Int>::from_data(TensorData::new(mask, [b, t]), device));
    let logp = log_softmax(model.forward(ids.clone(), mask), 2);
    let targets = ids.slice([0..b, 1..t]).unsqueeze_dim::<3>(2);
    let picked = logp.slice([0..b, 0..t - 1]).gather(2, targets);
    let flat: Vec<f32> = picked
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 data");
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            (0..r.len() - 1)
                .map(|j| flat[i * (t - 1) + j] as f64)
                .collect()
        })
        .collect()
}

/// Runs `check` on every backend compiled in. wgpu without an adapter skips with a notice, or
/// fails when `REQUIRE_WGPU=1` (as in CI).
pub fn on_each_backend(name: &str, check: impl Checker) {
    #[cfg(feature = "ndarray")]
    check.run::<burn::backend::NdArray>(&Default::default());
    #[cfg(feature = "flex")]
    check.run::<burn::backend::Flex>(&Default::default());
    #[cfg(feature = "wgpu")]
    if prefer::backend::wgpu_ready(name) {
        check.run::<burn::backend::Wgpu>(&Default::default());
    }
    #[cfg(feature = "cuda")]
    check.run::<burn::backend::Cuda>(&burn::backend::cuda::CudaDevice::new(0));
    let _ = name;
}

/// A check generic over the backend.
pub trait Checker {
    fn run<B: prefer::kernels::PreferBackend>(&self, device: &B::Device);
}

impl<C: Checker> Checker for &C {
    fn run<B: prefer::kernels::PreferBackend>(&self, device: &B::Device) {
        (**self).run::<B>(device)
    }
}
