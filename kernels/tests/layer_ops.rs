//! The decoder-layer operations — RMSNorm, SwiGLU, rotary embedding, variable-length causal
//! attention, the LoRA update and the frozen-weight product — values and gradients under Autodiff against the formulas in f64 on the host, on
//! random inputs: packed sequences of odd lengths (1, an empty one, lengths across the 64-row block
//! of the CPU attention loop), grouped-query heads, and a padded (uniform) batch. On every backend
//! compiled in (the burn-flex CPU fast paths in f32; tensor operations elsewhere), f32, f16, bf16.

mod common;

use burn::{backend::Autodiff, tensor::DType};
use common::{host, rounded, tensor};
use prefer_kernels::{
    AttentionBackend, FrozenMatmulBackend, HeadShape, LoraBackend, RmsNormBackend, RopeBackend,
    SeqLayout, SwiGluBackend, frozen_matmul, lora_update, rms_norm, rope, swiglu, varlen_attention,
};

fn random(n: usize, seed: u64, scale: f64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0) * scale) as f32
        })
        .collect()
}

/// `|got − want| ≤ tol · max(|want|, floor)` elementwise, `floor` a tenth of the largest magnitude
/// of `want`: the outputs are sums of signed terms, so an element that nearly cancels is judged
/// against the scale of its terms, not its own.
fn close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let floor = want.iter().fold(0f64, |m, w| m.max(w.abs())) / 10.0;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.is_finite() && (*g as f64 - w).abs() <= tol * w.abs().max(floor).max(1e-6),
            "{what}: element {i}: {g} vs {w}"
        );
    }
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn tol(dtype: DType) -> f64 {
    // Half types: inputs and outputs rounded to 8 (bf16) or 11 (f16) significant bits, f32 inside.
    match dtype {
        DType::F32 => 1e-5,
        _ => 2e-2,
    }
}

/// [`tol`] for outputs of matrix products: on backends whose f32 matmul runs as TF32 (inputs
/// rounded to 11 significant bits, ≈ 5e-4 each), a product's relative error reaches ≈ 1e-3.
fn matmul_tol(name: &str, dtype: DType) -> f64 {
    if dtype == DType::F32 && common::f32_matmul_is_tf32(name) {
        3e-3
    } else {
        tol(dtype)
    }
}

fn check_rms_norm<B: RmsNormBackend>(name: &str, device: &B::Device, dtype: DType) {
    let (n, h, eps) = (37, 96, 1e-5);
    let x = rounded(&random(n * h, 1, 3.0), dtype);
    let gamma = rounded(&random(h, 2, 1.0), dtype);
    let g = rounded(&random(n * h, 3, 1.0), dtype);
    let (mut y, mut dx, mut dgamma) = (vec![0.0; n * h], vec![0.0; n * h], vec![0.0; h]);
    for r in 0..n {
        let xr = f64s(&x[r * h..(r + 1) * h]);
        let rs = 1.0 / (xr.iter().map(|v| v * v).sum::<f64>() / h as f64 + eps).sqrt();
        let mut dot = 0.0;
        for i in 0..h {
            y[r * h + i] = gamma[i] as f64 * xr[i] * rs;
            dgamma[i] += g[r * h + i] as f64 * xr[i] * rs;
            dot += g[r * h + i] as f64 * gamma[i] as f64 * xr[i] * rs;
        }
        for i in 0..h {
            let dxhat = g[r * h + i] as f64 * gamma[i] as f64;
            dx[r * h + i] = rs * (dxhat - xr[i] * rs * dot / h as f64);
        }
    }
    let xt = tensor::<Autodiff<B>, 2>(&x, [n, h], dtype, device).require_grad();
    let gt = tensor::<Autodiff<B>, 1>(&gamma, [h], dtype, device).require_grad();
    let out = rms_norm(xt.clone(), gt.clone(), eps);
    let what = format!("rms_norm {name} {dtype:?}");
    assert_eq!(out.dtype(), dtype, "{what}");
    close(&format!("{what} y"), &host(out.clone()), &y, tol(dtype));
    let grads = (out * tensor::<Autodiff<B>, 2>(&g, [n, h], dtype, device))
        .sum()
        .backward();
    close(
        &format!("{what} dx"),
        &host(xt.grad(&grads).unwrap()),
        &dx,
        tol(dtype),
    );
    close(
        &format!("{what} dgamma"),
        &host(gt.grad(&grads).unwrap()),
        &dgamma,
        tol(dtype),
    );
}

fn check_swiglu<B: SwiGluBackend>(name: &str, device: &B::Device, dtype: DType) {
    let (n, f) = (29, 70);
    let gate = rounded(&random(n * f, 4, 6.0), dtype);
    let up = rounded(&random(n * f, 5, 2.0), dtype);
    let g = rounded(&random(n * f, 6, 1.0), dtype);
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let (mut y, mut dg, mut du) = (vec![0.0; n * f], vec![0.0; n * f], vec![0.0; n * f]);
    for i in 0..n * f {
        let (a, b, d) = (gate[i] as f64, up[i] as f64, g[i] as f64);
        let s = sig(a);
        y[i] = a * s * b;
        dg[i] = d * b * s * (1.0 + a * (1.0 - s));
        du[i] = d * a * s;
    }
    let gt = tensor::<Autodiff<B>, 3>(&gate, [1, n, f], dtype, device).require_grad();
    let ut = tensor::<Autodiff<B>, 3>(&up, [1, n, f], dtype, device).require_grad();
    let out = swiglu(gt.clone(), ut.clone());
    let what = format!("swiglu {name} {dtype:?}");
    assert_eq!(out.dtype(), dtype, "{what}");
    close(&format!("{what} y"), &host(out.clone()), &y, tol(dtype));
    let grads = (out * tensor::<Autodiff<B>, 3>(&g, [1, n, f], dtype, device))
        .sum()
        .backward();
    close(
        &format!("{what} dgate"),
        &host(gt.grad(&grads).unwrap()),
        &dg,
        tol(dtype),
    );
    close(
        &format!("{what} dup"),
        &host(ut.grad(&grads).unwrap()),
        &du,
        tol(dtype),
    );
}

fn check_rope<B: RopeBackend>(name: &str, device: &B::Device, dtype: DType) {
    let (t, heads, hd) = (23, 3, 10);
    let half = hd / 2;
    let x = rounded(&random(t * heads * hd, 7, 2.0), dtype);
    let g = rounded(&random(t * heads * hd, 8, 1.0), dtype);
    let angles: Vec<f64> = (0..t * half)
        .map(|i| (i / half) as f64 * 0.37 / (1 + i % half) as f64)
        .collect();
    let cos: Vec<f32> = angles.iter().map(|a| a.cos() as f32).collect();
    let sin: Vec<f32> = angles.iter().map(|a| a.sin() as f32).collect();
    let (mut y, mut dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    for tok in 0..t {
        for h in 0..heads {
            let base = (tok * heads + h) * hd;
            for i in 0..half {
                let (c, s) = (cos[tok * half + i] as f64, sin[tok * half + i] as f64);
                let (x1, x2) = (x[base + i] as f64, x[base + half + i] as f64);
                y[base + i] = x1 * c - x2 * s;
                y[base + half + i] = x2 * c + x1 * s;
                let (g1, g2) = (g[base + i] as f64, g[base + half + i] as f64);
                dx[base + i] = g1 * c + g2 * s;
                dx[base + half + i] = -g1 * s + g2 * c;
            }
        }
    }
    let xt = tensor::<Autodiff<B>, 2>(&x, [t, heads * hd], dtype, device).require_grad();
    let ct = tensor::<Autodiff<B>, 2>(&cos, [t, half], DType::F32, device);
    let st = tensor::<Autodiff<B>, 2>(&sin, [t, half], DType::F32, device);
    let out = rope(xt.clone(), ct, st, heads);
    let what = format!("rope {name} {dtype:?}");
    assert_eq!(out.dtype(), dtype, "{what}");
    close(&format!("{what} y"), &host(out.clone()), &y, tol(dtype));
    let grads = (out * tensor::<Autodiff<B>, 2>(&g, [t, heads * hd], dtype, device))
        .sum()
        .backward();
    close(
        &format!("{what} dx"),
        &host(xt.grad(&grads).unwrap()),
        &dx,
        tol(dtype),
    );
}

/// Attention and its gradients in f64, one sequence and head at a time.
#[allow(clippy::type_complexity)]
fn naive_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    g: &[f32],
    layout: &SeqLayout,
    s: HeadShape,
    scale: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (h, kvh, d) = (s.heads, s.kv_heads, s.head_dim);
    let rep = h / kvh;
    let (mut o, mut dq) = (vec![0.0; q.len()], vec![0.0; q.len()]);
    let (mut dk, mut dv) = (vec![0.0; k.len()], vec![0.0; k.len()]);
    let qi = |t: usize, j: usize, i: usize| (t * h + j) * d + i;
    let ki = |t: usize, gh: usize, i: usize| (t * kvh + gh) * d + i;
    for r in layout.ranges() {
        for j in 0..h {
            let gh = j / rep;
            for a in r.clone() {
                let keys: Vec<usize> = (r.start..=a).collect();
                let sc: Vec<f64> = keys
                    .iter()
                    .map(|&b| {
                        (0..d)
                            .map(|i| q[qi(a, j, i)] as f64 * k[ki(b, gh, i)] as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                let p: Vec<f64> = sc.iter().map(|x| (x - m).exp() / z).collect();
                for i in 0..d {
                    o[qi(a, j, i)] = keys
                        .iter()
                        .zip(&p)
                        .map(|(&b, pb)| pb * v[ki(b, gh, i)] as f64)
                        .sum();
                }
                let dp: Vec<f64> = keys
                    .iter()
                    .map(|&b| {
                        (0..d)
                            .map(|i| g[qi(a, j, i)] as f64 * v[ki(b, gh, i)] as f64)
                            .sum()
                    })
                    .collect();
                let pdp: f64 = p.iter().zip(&dp).map(|(x, y)| x * y).sum();
                for (n, &b) in keys.iter().enumerate() {
                    let ds = p[n] * (dp[n] - pdp) * scale;
                    for i in 0..d {
                        dq[qi(a, j, i)] += ds * k[ki(b, gh, i)] as f64;
                        dk[ki(b, gh, i)] += ds * q[qi(a, j, i)] as f64;
                        dv[ki(b, gh, i)] += p[n] * g[qi(a, j, i)] as f64;
                    }
                }
            }
        }
    }
    (o, dq, dk, dv)
}

fn check_attention<B: AttentionBackend>(name: &str, device: &B::Device, dtype: DType) {
    let cases = [
        (
            SeqLayout::packed(&[5, 0, 70, 1, 130]),
            HeadShape {
                heads: 4,
                kv_heads: 2,
                head_dim: 8,
            },
        ),
        (
            SeqLayout::uniform(3, 33),
            HeadShape {
                heads: 3,
                kv_heads: 3,
                head_dim: 6,
            },
        ),
        (
            SeqLayout::packed(&[65]),
            HeadShape {
                heads: 6,
                kv_heads: 1,
                head_dim: 4,
            },
        ),
    ];
    for (seed, (layout, s)) in cases.into_iter().enumerate() {
        let seed = 10 * seed as u64;
        let t = layout.tokens();
        let (qw, kw) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
        let q = rounded(&random(t * qw, seed + 11, 2.0), dtype);
        let k = rounded(&random(t * kw, seed + 12, 2.0), dtype);
        let v = rounded(&random(t * kw, seed + 13, 1.0), dtype);
        let g = rounded(&random(t * qw, seed + 14, 1.0), dtype);
        let scale = 1.0 / (s.head_dim as f64).sqrt();
        let (o, dq, dk, dv) = naive_attention(&q, &k, &v, &g, &layout, s, scale);
        let qt = tensor::<Autodiff<B>, 2>(&q, [t, qw], dtype, device).require_grad();
        let kt = tensor::<Autodiff<B>, 2>(&k, [t, kw], dtype, device).require_grad();
        let vt = tensor::<Autodiff<B>, 2>(&v, [t, kw], dtype, device).require_grad();
        let out = varlen_attention(qt.clone(), kt.clone(), vt.clone(), &layout, s, scale);
        let what = format!("attention {name} {dtype:?} {layout:?} {s:?}");
        assert_eq!(out.dtype(), dtype, "{what}");
        close(
            &format!("{what} out"),
            &host(out.clone()),
            &o,
            matmul_tol(name, dtype),
        );
        let grads = (out * tensor::<Autodiff<B>, 2>(&g, [t, qw], dtype, device))
            .sum()
            .backward();
        close(
            &format!("{what} dq"),
            &host(qt.grad(&grads).unwrap()),
            &dq,
            matmul_tol(name, dtype),
        );
        close(
            &format!("{what} dk"),
            &host(kt.grad(&grads).unwrap()),
            &dk,
            matmul_tol(name, dtype),
        );
        close(
            &format!("{what} dv"),
            &host(vt.grad(&grads).unwrap()),
            &dv,
            matmul_tol(name, dtype),
        );
    }
}

/// The inference path (no autodiff) gives the same values.
fn check_attention_inference<B: AttentionBackend>(name: &str, device: &B::Device, dtype: DType) {
    let layout = SeqLayout::packed(&[3, 80, 9]);
    let s = HeadShape {
        heads: 2,
        kv_heads: 1,
        head_dim: 16,
    };
    let t = layout.tokens();
    let q = rounded(&random(t * 32, 21, 2.0), dtype);
    let k = rounded(&random(t * 16, 22, 2.0), dtype);
    let v = rounded(&random(t * 16, 23, 1.0), dtype);
    let (o, ..) = naive_attention(&q, &k, &v, &vec![0.0; t * 32], &layout, s, 0.25);
    let out = varlen_attention(
        tensor::<B, 2>(&q, [t, 32], dtype, device),
        tensor::<B, 2>(&k, [t, 16], dtype, device),
        tensor::<B, 2>(&v, [t, 16], dtype, device),
        &layout,
        s,
        0.25,
    );
    close(
        &format!("attention inference {name} {dtype:?}"),
        &host(out),
        &o,
        matmul_tol(name, dtype),
    );
}

fn check_lora<B: LoraBackend>(name: &str, device: &B::Device, dtype: DType) {
    let (n, d_in, d_out, r, scale) = (70, 24, 33, 5, 1.7);
    let y = rounded(&random(n * d_out, 31, 2.0), dtype);
    let x = rounded(&random(n * d_in, 32, 2.0), dtype);
    let a = rounded(&random(d_in * r, 33, 1.0), dtype);
    let b = rounded(&random(r * d_out, 34, 1.0), dtype);
    let g = rounded(&random(n * d_out, 35, 1.0), dtype);
    let h: Vec<f64> = (0..n * r)
        .map(|i| {
            let (row, k) = (i / r, i % r);
            (0..d_in)
                .map(|j| x[row * d_in + j] as f64 * a[j * r + k] as f64)
                .sum()
        })
        .collect();
    let out: Vec<f64> = (0..n * d_out)
        .map(|i| {
            let (row, o) = (i / d_out, i % d_out);
            y[i] as f64
                + scale
                    * (0..r)
                        .map(|k| h[row * r + k] * b[k * d_out + o] as f64)
                        .sum::<f64>()
        })
        .collect();
    // dh = scale · g·Bᵀ; dx = dh·Aᵀ; dA = xᵀ·dh; dB = scale · hᵀ·g.
    let dh: Vec<f64> = (0..n * r)
        .map(|i| {
            let (row, k) = (i / r, i % r);
            scale
                * (0..d_out)
                    .map(|o| g[row * d_out + o] as f64 * b[k * d_out + o] as f64)
                    .sum::<f64>()
        })
        .collect();
    let dx: Vec<f64> = (0..n * d_in)
        .map(|i| {
            let (row, j) = (i / d_in, i % d_in);
            (0..r).map(|k| dh[row * r + k] * a[j * r + k] as f64).sum()
        })
        .collect();
    let da: Vec<f64> = (0..d_in * r)
        .map(|i| {
            let (j, k) = (i / r, i % r);
            (0..n)
                .map(|row| x[row * d_in + j] as f64 * dh[row * r + k])
                .sum()
        })
        .collect();
    let db: Vec<f64> = (0..r * d_out)
        .map(|i| {
            let (k, o) = (i / d_out, i % d_out);
            scale
                * (0..n)
                    .map(|row| h[row * r + k] * g[row * d_out + o] as f64)
                    .sum::<f64>()
        })
        .collect();
    let yt = tensor::<Autodiff<B>, 3>(&y, [2, n / 2, d_out], dtype, device).require_grad();
    let xt = tensor::<Autodiff<B>, 3>(&x, [2, n / 2, d_in], dtype, device).require_grad();
    let at = tensor::<Autodiff<B>, 2>(&a, [d_in, r], dtype, device).require_grad();
    let bt = tensor::<Autodiff<B>, 2>(&b, [r, d_out], dtype, device).require_grad();
    let o = lora_update(yt.clone(), xt.clone(), at.clone(), bt.clone(), scale);
    let what = format!("lora {name} {dtype:?}");
    assert_eq!(o.dtype(), dtype, "{what}");
    close(
        &format!("{what} out"),
        &host(o.clone()),
        &out,
        matmul_tol(name, dtype),
    );
    let grads = (o * tensor::<Autodiff<B>, 3>(&g, [2, n / 2, d_out], dtype, device))
        .sum()
        .backward();
    close(
        &format!("{what} dy"),
        &host(yt.grad(&grads).unwrap()),
        &f64s(&g),
        matmul_tol(name, dtype),
    );
    close(
        &format!("{what} dx"),
        &host(xt.grad(&grads).unwrap()),
        &dx,
        matmul_tol(name, dtype),
    );
    close(
        &format!("{what} dA"),
        &host(at.grad(&grads).unwrap()),
        &da,
        matmul_tol(name, dtype),
    );
    close(
        &format!("{what} dB"),
        &host(bt.grad(&grads).unwrap()),
        &db,
        matmul_tol(name, dtype),
    );
    // Without autodiff: a base output that nothing else holds may be updated in place (the CPU
    // path does), one that the caller still holds must be left as it was.
    let operands = || {
        (
            tensor::<B, 3>(&x, [2, n / 2, d_in], dtype, device),
            tensor::<B, 2>(&a, [d_in, r], dtype, device),
            tensor::<B, 2>(&b, [r, d_out], dtype, device),
        )
    };
    let (x1, a1, b1) = operands();
    let only = tensor::<B, 3>(&y, [2, n / 2, d_out], dtype, device);
    let o = lora_update(only, x1, a1, b1, scale);
    close(
        &format!("{what} out, base output held by no one else"),
        &host(o),
        &out,
        matmul_tol(name, dtype),
    );
    let (x2, a2, b2) = operands();
    let held = tensor::<B, 3>(&y, [2, n / 2, d_out], dtype, device);
    let o = lora_update(held.clone(), x2, a2, b2, scale);
    close(
        &format!("{what} out, base output still held"),
        &host(o),
        &out,
        matmul_tol(name, dtype),
    );
    assert_eq!(host(held), y, "{what}: the caller's base output changed");
}

fn check_frozen_matmul<B: FrozenMatmulBackend>(name: &str, device: &B::Device, dtype: DType) {
    // 134 rows: enough for the CPU path to reorder a transposed weight before the product.
    let (batch, rows, d_in, d_out) = (2, 67, 40, 29);
    let n = batch * rows;
    let x = rounded(&random(n * d_in, 41, 2.0), dtype);
    // The weight as the model holds it, `[out, in]`, used through its transposed view as the NF4
    // layer does, and stored `[in, out]` as the dense layer does.
    let w_out_in = rounded(&random(d_out * d_in, 42, 1.0), dtype);
    let w_in_out: Vec<f32> = (0..d_in * d_out)
        .map(|i| w_out_in[(i % d_out) * d_in + i / d_out])
        .collect();
    let g = rounded(&random(n * d_out, 43, 1.0), dtype);
    let w = |i: usize, o: usize| w_out_in[o * d_in + i] as f64;
    let y: Vec<f64> = (0..n * d_out)
        .map(|e| {
            let (r, o) = (e / d_out, e % d_out);
            (0..d_in).map(|i| x[r * d_in + i] as f64 * w(i, o)).sum()
        })
        .collect();
    let dx: Vec<f64> = (0..n * d_in)
        .map(|e| {
            let (r, i) = (e / d_in, e % d_in);
            (0..d_out).map(|o| g[r * d_out + o] as f64 * w(i, o)).sum()
        })
        .collect();
    let dw: Vec<f64> = (0..d_in * d_out)
        .map(|e| {
            let (i, o) = (e / d_out, e % d_out);
            (0..n)
                .map(|r| x[r * d_in + i] as f64 * g[r * d_out + o] as f64)
                .sum()
        })
        .collect();
    let tol = matmul_tol(name, dtype);
    for transposed in [false, true] {
        for trains in [false, true] {
            let what =
                format!("frozen_matmul {name} {dtype:?} transposed={transposed} trains={trains}");
            let xt =
                tensor::<Autodiff<B>, 3>(&x, [batch, rows, d_in], dtype, device).require_grad();
            let wt = if transposed {
                tensor::<Autodiff<B>, 2>(&w_out_in, [d_out, d_in], dtype, device)
            } else {
                tensor::<Autodiff<B>, 2>(&w_in_out, [d_in, d_out], dtype, device)
            };
            let wt = if trains { wt.require_grad() } else { wt };
            let view = if transposed {
                wt.clone().transpose()
            } else {
                wt.clone()
            };
            let out = frozen_matmul(xt.clone(), view);
            assert_eq!(out.dims(), [batch, rows, d_out], "{what}");
            close(&format!("{what} y"), &host(out.clone()), &y, tol);
            let grads = (out * tensor::<Autodiff<B>, 3>(&g, [batch, rows, d_out], dtype, device))
                .sum()
                .backward();
            close(
                &format!("{what} dx"),
                &host(xt.grad(&grads).unwrap()),
                &dx,
                tol,
            );
            match (trains, wt.grad(&grads)) {
                (false, None) => {}
                (true, Some(gw)) => {
                    let gw = if transposed { gw.transpose() } else { gw };
                    close(&format!("{what} dw"), &host(gw), &dw, tol)
                }
                (_, got) => panic!("{what}: weight gradient {:?}", got.map(|t| t.dims())),
            }
        }
    }
}

fn check<
    B: AttentionBackend
        + FrozenMatmulBackend
        + LoraBackend
        + RmsNormBackend
        + RopeBackend
        + SwiGluBackend,
>(
    name: &str,
    device: &B::Device,
    dtype: DType,
) {
    check_rms_norm::<B>(name, device, dtype);
    check_swiglu::<B>(name, device, dtype);
    check_rope::<B>(name, device, dtype);
    check_attention::<B>(name, device, dtype);
    check_attention_inference::<B>(name, device, dtype);
    check_lora::<B>(name, device, dtype);
    check_frozen_matmul::<B>(name, device, dtype);
}

on_every_backend!(check);
