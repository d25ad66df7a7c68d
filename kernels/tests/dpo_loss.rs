//! The DPO sigmoid-loss kernel (with label smoothing): per-pair losses, rewards and the gradient
//! with respect to the policy token log-probs, against the formulas in f64 on the host; random
//! inputs and masks, odd sizes (P = 1, T = 1, T not a multiple of the block); on the CPU and on
//! wgpu (Fusion and raw CubeBackend), under Autodiff; f32, f16 and bf16 policy log-probs.

mod common;

use burn::{
    backend::Autodiff,
    tensor::{DType, Tensor},
};
use common::{host, rounded, tensor};
use prefer_kernels::{DpoLossBackend, dpo_sigmoid_loss};

struct Case {
    p: usize,
    t: usize,
    beta: f64,
    eps: f64,
    policy: Vec<f32>,
    mask: Vec<f32>,
    reference: Vec<f32>,
    g: Vec<f32>,
}

fn case(p: usize, t: usize, beta: f64, eps: f64, seed: u64) -> Case {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut mask: Vec<f32> = (0..2 * p * t).map(|_| f32::from(next() > 0.3)).collect();
    for r in 0..2 * p {
        mask[r * t] = 1.0; // every row has a completion token
    }
    Case {
        p,
        t,
        beta,
        eps,
        policy: (0..2 * p * t)
            .map(|_| (-6.0 * next()) as f32 - 0.01)
            .collect(),
        mask,
        reference: (0..2 * p)
            .map(|_| (-3.0 * t as f64 * next()) as f32)
            .collect(),
        g: (0..p).map(|_| (next() * 2.0 - 1.0) as f32 + 0.2).collect(),
    }
}

/// (loss, chosen reward, rejected reward, gradient of Σ g·loss w.r.t. policy) in f64.
fn naive(c: &Case) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let sum = |r: usize| -> f64 {
        (0..c.t)
            .map(|j| c.policy[r * c.t + j] as f64 * c.mask[r * c.t + j] as f64)
            .sum::<f64>()
            - c.reference[r] as f64
    };
    let log_sig = |x: f64| -(1.0 + (-x).exp()).ln();
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let (mut loss, mut ch, mut rj) = (vec![0.0; c.p], vec![0.0; c.p], vec![0.0; c.p]);
    let mut grad = vec![0.0; 2 * c.p * c.t];
    for i in 0..c.p {
        let (a, b) = (sum(i), sum(i + c.p));
        let z = c.beta * (a - b);
        loss[i] = -(1.0 - c.eps) * log_sig(z) - c.eps * log_sig(-z);
        ch[i] = c.beta * a;
        rj[i] = c.beta * b;
        let coef = -c.beta * ((1.0 - c.eps) * sig(-z) - c.eps * sig(z)) * c.g[i] as f64;
        for j in 0..c.t {
            grad[i * c.t + j] = coef * c.mask[i * c.t + j] as f64;
            grad[(i + c.p) * c.t + j] = -coef * c.mask[(i + c.p) * c.t + j] as f64;
        }
    }
    (loss, ch, rj, grad)
}

fn close(what: &str, got: &[f32], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.is_finite() && (*g as f64 - w).abs() <= rel * w.abs().max(1e-2),
            "{what}: element {i}: {g} vs {w}"
        );
    }
}

fn check<B: DpoLossBackend>(name: &str, device: &B::Device, dtype: DType) {
    // f16/bf16: sums in f32 from the rounded inputs, outputs rounded to the input type.
    let rel = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
    for mut c in [
        case(1, 1, 0.1, 0.0, 1),
        case(3, 17, 0.1, 0.1, 2),
        case(8, 300, 0.5, 0.25, 3),
        case(5, 129, 2.0, 0.0, 4),
    ] {
        c.policy = rounded(&c.policy, dtype);
        c.reference = rounded(&c.reference, dtype);
        c.g = rounded(&c.g, dtype);
        let (loss, ch, rj, grad) = naive(&c);
        drop(Tensor::<B, 2>::full([2 * c.p, c.t], f32::NAN, device).into_data());
        let shape = [2 * c.p, c.t];
        let policy = tensor::<Autodiff<B>, 2>(&c.policy, shape, dtype, device).require_grad();
        // The mask and the reference sums stay f32: the loss casts them to the policy's type.
        let mask = tensor::<Autodiff<B>, 2>(&c.mask, shape, DType::F32, device);
        let reference = tensor::<Autodiff<B>, 1>(&c.reference, [2 * c.p], DType::F32, device);
        let g = tensor::<Autodiff<B>, 1>(&c.g, [c.p], dtype, device);
        let out = dpo_sigmoid_loss(policy.clone(), mask, reference, c.beta, c.eps);
        let what = format!(
            "{name} {dtype:?} P={} T={} β={} ε={}",
            c.p, c.t, c.beta, c.eps
        );
        assert_eq!(out.loss.dtype(), dtype, "{what}");
        close(&format!("{what} loss"), &host(out.loss.clone()), &loss, rel);
        close(
            &format!("{what} chosen"),
            &host(out.chosen_rewards),
            &ch,
            rel,
        );
        close(
            &format!("{what} rejected"),
            &host(out.rejected_rewards),
            &rj,
            rel,
        );
        let grads = (out.loss * g).sum().backward();
        close(
            &format!("{what} grad"),
            &host(policy.grad(&grads).unwrap()),
            &grad,
            rel,
        );
    }
}

on_every_backend!(check);
