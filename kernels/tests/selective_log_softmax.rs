//! Selective log-softmax, values and gradients, against a naive log-softmax + gather in f64 on the
//! host: random logits (never zeros), odd sizes, V = 1, V = 128 256, extreme logits (±1e4); on the CPU
//! (tensor ops), on wgpu through Fusion and on the raw CubeBackend, and under Autodiff; f32 within
//! 1e-5, f16/bf16 inputs within 1e-2 (see `on_every_backend!` for which backend runs which type).

mod common;

use burn::{
    backend::Autodiff,
    tensor::{DType, Int, Tensor, TensorData},
};
use common::{host, rounded, tensor};
use prefer_kernels::{SelectiveLogSoftmaxBackend, selective_log_softmax};

struct Case {
    /// Relative tolerance: 1e-5 for f32; with logits of magnitude 1e4 the f32 inputs themselves carry
    /// an absolute error of ~1e-3 in `x − lse`, so `exp(x − lse)` is only good to ~1e-3 relative.
    rel: f64,
    n: usize,
    v: usize,
    logits: Vec<f32>,
    targets: Vec<i64>,
    weights: Vec<f32>,
}

fn case(n: usize, v: usize, scale: f32, seed: u64) -> Case {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    let logits = (0..n * v)
        .map(|_| ((next() * 2.0 - 1.0) as f32) * scale + 0.01)
        .collect();
    let targets = (0..n)
        .map(|_| (next() * v as f64) as i64 % v as i64)
        .collect();
    let weights = (0..n).map(|_| (next() * 2.0 - 1.0) as f32 + 0.1).collect();
    Case {
        rel: if scale > 100.0 { 2e-3 } else { 1e-5 },
        n,
        v,
        logits,
        targets,
        weights,
    }
}

/// (logp, grad of Σ w·logp w.r.t. the logits), in f64.
fn naive(c: &Case) -> (Vec<f64>, Vec<f64>) {
    let mut logp = vec![0.0; c.n];
    let mut grad = vec![0.0; c.n * c.v];
    for r in 0..c.n {
        let row = &c.logits[r * c.v..(r + 1) * c.v];
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        let t = c.targets[r] as usize;
        logp[r] = row[t] as f64 - lse;
        for (j, &x) in row.iter().enumerate() {
            grad[r * c.v + j] = c.weights[r] as f64 * (f64::from(j == t) - (x as f64 - lse).exp());
        }
    }
    (logp, grad)
}

fn cases() -> Vec<Case> {
    vec![
        case(1, 1, 3.0, 1),
        case(5, 33, 3.0, 2),
        case(7, 4099, 5.0, 3),
        case(3, 128_256, 4.0, 4),
        case(4, 1000, 1e4, 5),
        case(300, 257, 2.0, 6),
    ]
}

fn close(what: &str, got: &[f32], want: &[f64], rel: f64) {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (*g as f64 - w).abs();
        assert!(
            g.is_finite() && err <= rel * w.abs().max(1e-3 * scale),
            "{what}: element {i}: {g} vs {w}"
        );
    }
}

fn check<B: SelectiveLogSoftmaxBackend>(name: &str, device: &B::Device, dtype: DType) {
    for mut c in cases() {
        // f16/bf16 inputs: the reference sees the rounded values; the kernel accumulates in f32 and
        // rounds its outputs to the input type.
        c.logits = rounded(&c.logits, dtype);
        c.weights = rounded(&c.weights, dtype);
        if dtype != DType::F32 {
            c.rel = 1e-2;
        }
        let name = format!("{name} {dtype:?}");
        let (want_logp, want_grad) = naive(&c);
        // Poison: fill and drop a NaN tensor of the output's size first.
        drop(Tensor::<B, 2>::full([c.n, c.v], f32::NAN, device).into_data());
        let x = tensor::<Autodiff<B>, 2>(&c.logits, [c.n, c.v], dtype, device).require_grad();
        let t = Tensor::<Autodiff<B>, 1, Int>::from_data(
            TensorData::new(c.targets.clone(), [c.n]),
            device,
        );
        let w = tensor::<Autodiff<B>, 1>(&c.weights, [c.n], dtype, device);
        let logp = selective_log_softmax(x.clone(), t);
        assert_eq!(logp.dtype(), dtype, "{name}: logp keeps the logits' type");
        let got = host(logp.clone());
        close(
            &format!("{name} logp N={} V={}", c.n, c.v),
            &got,
            &want_logp,
            c.rel,
        );
        let grads = (logp * w).sum().backward();
        let dx = x.grad(&grads).unwrap();
        assert_eq!(
            dx.dtype(),
            dtype,
            "{name}: the gradient keeps the logits' type"
        );
        let g = host(dx);
        close(
            &format!("{name} grad N={} V={}", c.n, c.v),
            &g,
            &want_grad,
            c.rel,
        );
    }
}

on_every_backend!(check);
