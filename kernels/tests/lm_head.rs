//! Fused LM head, values and gradients (hidden states and weight), against logits = h·Wᵀ, a naive
//! log-softmax + gather and their gradients in f64 on the host: random inputs, odd sizes, V = 1,
//! chunks that do not divide V, V = 128 256; on the CPU and on wgpu (Fusion and raw CubeBackend);
//! f32, f16 and bf16.

mod common;

use burn::{
    backend::Autodiff,
    tensor::{DType, Int, Tensor, TensorData},
};
use common::{host, rounded, tensor};
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

/// The f64 reference of Σ g·logp.
struct Naive {
    logp: Vec<f64>,
    lse: Vec<f64>,
    mean: Vec<f64>,
    dh: Vec<f64>,
    dw: Vec<f64>,
    /// Σ |terms| of each gradient element: the scale of its rounding error in f16/bf16, where
    /// `dlogits` (of magnitude ~g at the target) is rounded before the sums cancel.
    dh_mag: Vec<f64>,
    dw_mag: Vec<f64>,
    /// Σ |coefficient of dlogits| of each gradient element: in f16, `dlogits` below 6e-5 (every
    /// non-target column at V = 128 256) is subnormal and rounds to a multiple of 2^-24.
    dh_sub: Vec<f64>,
    dw_sub: Vec<f64>,
}

/// The reference from logits rounded to `dtype`, as the backend's matmul rounds them.
fn naive(c: &Case, dtype: DType) -> Naive {
    let (mut logp, mut lse, mut mean) = (vec![0.0; c.n], vec![0.0; c.n], vec![0.0; c.n]);
    let (mut dh, mut dw) = (vec![0.0; c.n * c.h], vec![0.0; c.v * c.h]);
    let (mut dh_mag, mut dw_mag) = (vec![0.0; c.n * c.h], vec![0.0; c.v * c.h]);
    let (mut dh_sub, mut dw_sub) = (vec![0.0; c.n * c.h], vec![0.0; c.v * c.h]);
    for r in 0..c.n {
        let x = &c.hidden[r * c.h..(r + 1) * c.h];
        let logits: Vec<f64> = (0..c.v)
            .map(|j| {
                let w = &c.weight[j * c.h..(j + 1) * c.h];
                x.iter().zip(w).map(|(a, b)| *a as f64 * *b as f64).sum()
            })
            .collect();
        let logits: Vec<f64> =
            rounded(&logits.iter().map(|&x| x as f32).collect::<Vec<_>>(), dtype)
                .iter()
                .zip(&logits)
                .map(|(&r, &x)| if dtype == DType::F32 { x } else { r as f64 })
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
                dh_mag[r * c.h + k] += (d * c.weight[j * c.h + k] as f64).abs();
                dw_mag[j * c.h + k] += (d * x[k] as f64).abs();
                dh_sub[r * c.h + k] += (c.weight[j * c.h + k] as f64).abs();
                dw_sub[j * c.h + k] += (x[k] as f64).abs();
            }
        }
    }
    Naive {
        logp,
        lse,
        mean,
        dh,
        dw,
        dh_mag,
        dw_mag,
        dh_sub,
        dw_sub,
    }
}

/// `|got − want| ≤ rel · max(|want|, floor) + abs`, with `floor` per element (`mag`) or 1 % of the
/// largest `|want|`, and `abs` per element (f16 subnormals) or 0.
fn close(
    what: &str,
    got: &[f32],
    want: &[f64],
    rel: f64,
    mag: Option<&[f64]>,
    abs: Option<Vec<f64>>,
) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let floor = mag.map_or(1e-2 * scale, |m| m[i]);
        let abs = abs.as_ref().map_or(0.0, |a| a[i]);
        let err = (*g as f64 - w).abs();
        assert!(
            g.is_finite() && err <= rel * w.abs().max(floor) + abs,
            "{what}: element {i}: {g} vs {w}"
        );
    }
}

fn check<B: FusedLmHeadBackend>(name: &str, device: &B::Device, dtype: DType) {
    // f16/bf16: the reference sees the rounded inputs and logits; values within 1e-2, gradients
    // within 1e-2 of the magnitude of their summands.
    // TF32 f32 matmuls (CUDA): logits within ≈ 1e-3 of their magnitude, judged like half types
    // against the magnitude of the summands, at 3e-3.
    let half = dtype != DType::F32;
    let tf32 = !half && common::f32_matmul_is_tf32(name);
    let tol = |f32_rel: f64| match (half, tf32) {
        (true, _) => 1e-2,
        (false, true) => 3e-3,
        (false, false) => f32_rel,
    };
    for mut c in [
        case(1, 1, 8, 4, 1),
        case(5, 33, 16, 8, 2),
        case(7, 4099, 32, 1024, 3),
        case(3, 128_256, 16, 4096, 4),
        case(64, 1000, 64, 96, 5),
    ] {
        c.hidden = rounded(&c.hidden, dtype);
        c.weight = rounded(&c.weight, dtype);
        c.g = rounded(&c.g, dtype);
        let want = naive(&c, dtype);
        drop(Tensor::<B, 2>::full([c.n, c.chunk.min(c.v)], f32::NAN, device).into_data());
        let hidden = tensor::<Autodiff<B>, 2>(&c.hidden, [c.n, c.h], dtype, device).require_grad();
        let weight = tensor::<Autodiff<B>, 2>(&c.weight, [c.v, c.h], dtype, device).require_grad();
        let t = Tensor::<Autodiff<B>, 1, Int>::from_data(
            TensorData::new(c.targets.clone(), [c.n]),
            device,
        );
        let g = tensor::<Autodiff<B>, 1>(&c.g, [c.n], dtype, device);
        let out = fused_lm_head(hidden.clone(), weight.clone(), t, c.chunk);
        let what = format!(
            "{name} {dtype:?} N={} V={} H={} chunk={}",
            c.n, c.v, c.h, c.chunk
        );
        assert_eq!(out.logp.dtype(), dtype, "{what}");
        assert_eq!(out.lse.dtype(), DType::F32, "{what}");
        close(
            &format!("{what} logp"),
            &host(out.logp.clone()),
            &want.logp,
            tol(1e-5),
            None,
            None,
        );
        close(
            &format!("{what} lse"),
            &host(out.lse),
            &want.lse,
            tol(1e-5),
            None,
            None,
        );
        close(
            &format!("{what} mean"),
            &host(out.mean_logit),
            &want.mean,
            tol(1e-4),
            None,
            None,
        );
        // Half an f16 subnormal step per rounded dlogit, times its coefficient, plus the output's own.
        let subnormal = |sub: &[f64]| {
            (dtype == DType::F16).then(|| sub.iter().map(|s| (s + 1.0) * 2f64.powi(-25)).collect())
        };
        let grads = (out.logp * g).sum().backward();
        close(
            &format!("{what} d hidden"),
            &host(hidden.grad(&grads).unwrap()),
            &want.dh,
            tol(1e-4),
            (half || tf32).then_some(&want.dh_mag[..]),
            subnormal(&want.dh_sub),
        );
        close(
            &format!("{what} d weight"),
            &host(weight.grad(&grads).unwrap()),
            &want.dw,
            tol(1e-4),
            (half || tf32).then_some(&want.dw_mag[..]),
            subnormal(&want.dw_sub),
        );
        // A frozen head (LoRA training): only the hidden states' gradient is asked for, which
        // backends may compute on a path of their own.
        let hidden = tensor::<Autodiff<B>, 2>(&c.hidden, [c.n, c.h], dtype, device).require_grad();
        let weight = tensor::<Autodiff<B>, 2>(&c.weight, [c.v, c.h], dtype, device);
        let t = Tensor::<Autodiff<B>, 1, Int>::from_data(
            TensorData::new(c.targets.clone(), [c.n]),
            device,
        );
        let g = tensor::<Autodiff<B>, 1>(&c.g, [c.n], dtype, device);
        let out = fused_lm_head(hidden.clone(), weight, t, c.chunk);
        let grads = (out.logp * g).sum().backward();
        close(
            &format!("{what} d hidden (frozen head)"),
            &host(hidden.grad(&grads).unwrap()),
            &want.dh,
            tol(1e-4),
            (half || tf32).then_some(&want.dh_mag[..]),
            subnormal(&want.dh_sub),
        );
    }
}

on_every_backend!(check);
