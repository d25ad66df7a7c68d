//! Fused LM head, values and gradients (hidden states and weight), against logits = h·Wᵀ, a naive
//! log-softmax + gather and their gradients in f64 on the host: random inputs, odd sizes, V = 1,
//! chunks that do not divide V, V = 128 256; on the CPU and on wgpu (Fusion and raw CubeBackend).

mod common;

use burn::{
    backend::Autodiff,
    tensor::{Int, Tensor, TensorData},
};
use prefer_kernels::{FusedLmHeadBackend, fused_lm_head};

struct Case {
    n: usize,
    v: usize,
    h: usize,
    chunk: usize,
    hidden: Vec<f32>,
    weight: Vec<f32>,
    targets: Vec<i64>,
    g: Vec<f32>,
}

fn case(n: usize, v: usize, h: usize, chunk: usize, seed: u64) -> Case {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    };
    let scale = 3.0 / (h as f64).sqrt();
    Case {
        n,
        v,
        h,
        chunk,
        hidden: (0..n * h).map(|_| next() as f32 + 0.01).collect(),
        weight: (0..v * h).map(|_| (next() * scale) as f32).collect(),
        targets: (0..n)
            .map(|_| ((next() + 1.0) / 2.0 * v as f64) as i64 % v as i64)
            .collect(),
        g: (0..n).map(|_| next() as f32 + 0.1).collect(),
    }
}

/// (logp, lse, mean logit, d hidden, d weight) of Σ g·logp, in f64.
#[allow(clippy::type_complexity)]
fn naive(c: &Case) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut logp, mut lse, mut mean) = (vec![0.0; c.n], vec![0.0; c.n], vec![0.0; c.n]);
    let (mut dh, mut dw) = (vec![0.0; c.n * c.h], vec![0.0; c.v * c.h]);
    for r in 0..c.n {
        let x = &c.hidden[r * c.h..(r + 1) * c.h];
        let logits: Vec<f64> = (0..c.v)
            .map(|j| {
                let w = &c.weight[j * c.h..(j + 1) * c.h];
                x.iter().zip(w).map(|(a, b)| *a as f64 * *b as f64).sum()
            })
            .collect();
        let m = logits.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x));
        lse[r] = m + logits.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        let t = c.targets[r] as usize;
        logp[r] = logits[t] - lse[r];
        mean[r] = logits.iter().sum::<f64>() / c.v as f64;
        for j in 0..c.v {
            let d = c.g[r] as f64 * (f64::from(j == t) - (logits[j] - lse[r]).exp());
            for k in 0..c.h {
                dh[r * c.h + k] += d * c.weight[j * c.h + k] as f64;
                dw[j * c.h + k] += d * x[k] as f64;
            }
        }
    }
    (logp, lse, mean, dh, dw)
}

fn close(what: &str, got: &[f32], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (*g as f64 - w).abs();
        assert!(
            g.is_finite() && err <= rel * w.abs().max(1e-2 * scale),
            "{what}: element {i}: {g} vs {w}"
        );
    }
}

fn host<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

fn check<B: FusedLmHeadBackend>(name: &str, device: &B::Device) {
    for c in [
        case(1, 1, 8, 4, 1),
        case(5, 33, 16, 8, 2),
        case(7, 4099, 32, 1024, 3),
        case(3, 128_256, 16, 4096, 4),
        case(64, 1000, 64, 96, 5),
    ] {
        let (logp, lse, mean, dh, dw) = naive(&c);
        drop(Tensor::<B, 2>::full([c.n, c.chunk.min(c.v)], f32::NAN, device).into_data());
        let hidden = Tensor::<Autodiff<B>, 2>::from_data(
            TensorData::new(c.hidden.clone(), [c.n, c.h]),
            device,
        )
        .require_grad();
        let weight = Tensor::<Autodiff<B>, 2>::from_data(
            TensorData::new(c.weight.clone(), [c.v, c.h]),
            device,
        )
        .require_grad();
        let t = Tensor::<Autodiff<B>, 1, Int>::from_data(
            TensorData::new(c.targets.clone(), [c.n]),
            device,
        );
        let g = Tensor::<Autodiff<B>, 1>::from_data(TensorData::new(c.g.clone(), [c.n]), device);
        let out = fused_lm_head(hidden.clone(), weight.clone(), t, c.chunk);
        let what = format!("{name} N={} V={} H={} chunk={}", c.n, c.v, c.h, c.chunk);
        close(
            &format!("{what} logp"),
            &host(out.logp.clone()),
            &logp,
            1e-5,
        );
        close(&format!("{what} lse"), &host(out.lse), &lse, 1e-5);
        close(&format!("{what} mean"), &host(out.mean_logit), &mean, 1e-4);
        let grads = (out.logp * g).sum().backward();
        close(
            &format!("{what} d hidden"),
            &host(hidden.grad(&grads).unwrap()),
            &dh,
            1e-4,
        );
        close(
            &format!("{what} d weight"),
            &host(weight.grad(&grads).unwrap()),
            &dw,
            1e-4,
        );
    }
}

on_every_backend!(check);
