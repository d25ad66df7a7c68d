//! RMSNorm with a hand-written backward: `y = γ ∘ x / √(mean(x²) + ε)` over the last dimension, in
//! f32 arithmetic, the normalised input rounded to the input type before the product with `γ` (as
//! transformers' `LlamaRMSNorm`). Only `x` and the per-row `1/√(mean(x²) + ε)` are kept for the
//! backward pass, instead of the four or five intermediates autodiff would keep.

use burn::{
    backend::{
        Autodiff,
        autodiff::{
            NodeId,
            checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
            grads::Gradients,
            ops::{Backward, Ops, OpsKind},
        },
    },
    tensor::{
        DType, Tensor, TensorPrimitive,
        backend::{AutodiffBackend, Backend},
        ops::FloatTensor,
    },
};

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// The RMSNorm operations on rows `[N, H]`.
pub trait RmsNormBackend: Backend {
    /// `x` `[N, H]`, `gamma` `[H]` → (`y` `[N, H]` in `x`'s type, `rstd` `[N]` in f32). The default
    /// implementation uses tensor operations.
    fn rms_norm_forward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        tensor_ops::forward::<Self>(x, gamma, eps)
    }

    /// Gradients of `Σ dy ∘ y` for `x` and, when asked, `gamma`:
    /// `dx = r·(dx̂ − x̂·mean(dx̂ ∘ x̂))` with `dx̂ = dy ∘ γ`, and `dγ = Σ_rows dy ∘ x̂`.
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        gamma_grad: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        tensor_ops::backward::<Self>(x, gamma, rstd, dy, gamma_grad)
    }
}

/// The operations written with tensor operations, for any backend.
pub(crate) mod tensor_ops {
    use super::*;

    pub fn forward<B: Backend>(
        x: FloatTensor<B>,
        gamma: FloatTensor<B>,
        eps: f64,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let x: Tensor<B, 2> = float(x);
        let dtype = x.dtype();
        let x32 = x.cast(DType::F32);
        let rstd = (x32.clone().square().mean_dim(1) + eps).sqrt().recip();
        let xhat = (x32 * rstd.clone()).cast(dtype);
        let y = xhat * float::<B, 1>(gamma).cast(dtype).unsqueeze();
        let n = rstd.dims()[0];
        (prim(y), prim(rstd.reshape([n])))
    }

    pub fn backward<B: Backend>(
        x: FloatTensor<B>,
        gamma: FloatTensor<B>,
        rstd: FloatTensor<B>,
        dy: FloatTensor<B>,
        gamma_grad: bool,
    ) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
        let x: Tensor<B, 2> = float(x);
        let dtype = x.dtype();
        let [n, h] = x.dims();
        let r = float::<B, 1>(rstd).reshape([n, 1]);
        let xhat = x.cast(DType::F32) * r.clone();
        let dy = float::<B, 2>(dy).cast(DType::F32);
        let g = float::<B, 1>(gamma).cast(DType::F32).reshape([1, h]);
        let dxhat = dy.clone() * g;
        let dot = (dxhat.clone() * xhat.clone()).mean_dim(1);
        let dx = (dxhat - xhat.clone() * dot) * r;
        let dgamma = gamma_grad.then(|| prim((dy * xhat).sum_dim(0).reshape([h]).cast(dtype)));
        (prim(dx.cast(dtype)), dgamma)
    }
}

/// RMSNorm over the last dimension of `x`, scaled by `gamma` `[H]`.
pub fn rms_norm<B: RmsNormBackend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let dims = x.dims();
    let h = dims[D - 1];
    let rows = x.shape().num_elements() / h.max(1);
    let (y, _) = B::rms_norm_forward(prim(x.reshape([rows, h])), prim(gamma), eps);
    float::<B, 2>(y).reshape(dims)
}

#[cfg(feature = "ndarray")]
impl RmsNormBackend for burn::backend::NdArray {}

#[derive(Debug)]
struct RmsNormBackward;

impl<B: RmsNormBackend> Backward<B, 2> for RmsNormBackward {
    type State = (NodeId, NodeId, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [x_parent, gamma_parent] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (x_id, gamma_id, rstd) = ops.state;
        let x: FloatTensor<B> = checkpointer.retrieve_node_output(x_id);
        let gamma: FloatTensor<B> = checkpointer.retrieve_node_output(gamma_id);
        let (dx, dgamma) = B::rms_norm_backward(x, gamma, rstd, dy, gamma_parent.is_some());
        if let Some(p) = x_parent {
            grads.register::<B>(p.id, dx);
        }
        if let (Some(p), Some(dg)) = (gamma_parent, dgamma) {
            grads.register::<B>(p.id, dg);
        }
    }
}

impl<B: RmsNormBackend, C: CheckpointStrategy> RmsNormBackend for Autodiff<B, C> {
    fn rms_norm_forward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let lift = <Self as AutodiffBackend>::from_inner;
        match RmsNormBackward
            .prepare::<C>([x.node.clone(), gamma.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x_id = prep.checkpoint(&x);
                let gamma_id = prep.checkpoint(&gamma);
                let (y, rstd) = B::rms_norm_forward(x.primitive, gamma.primitive, eps);
                (prep.finish((x_id, gamma_id, rstd.clone()), y), lift(rstd))
            }
            OpsKind::UnTracked(prep) => {
                let (y, rstd) = B::rms_norm_forward(x.primitive, gamma.primitive, eps);
                (prep.finish(y), lift(rstd))
            }
        }
    }

    fn rms_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        gamma_grad: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        let lift = <Self as AutodiffBackend>::from_inner;
        let (dx, dg) = B::rms_norm_backward(
            x.primitive,
            gamma.primitive,
            rstd.primitive,
            dy.primitive,
            gamma_grad,
        );
        (lift(dx), dg.map(lift))
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::tensor::{DType, ops::FloatTensor};
    use burn_flex::Flex;
    use rayon::prelude::*;

    use super::{RmsNormBackend, tensor_ops};
    use crate::cpu::{f32_slice, f32_tensor, is_f32, par_rows, rounding, store};

    /// Rows in parallel, f32 only (other types take the tensor-op path).
    impl RmsNormBackend for Flex {
        fn rms_norm_forward(
            x: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            eps: f64,
        ) -> (FloatTensor<Self>, FloatTensor<Self>) {
            if !is_f32(&[&x, &gamma]) {
                return tensor_ops::forward::<Self>(x, gamma, eps);
            }
            let (shape, dtype) = (x.layout().shape().clone(), x.dtype());
            let h = shape[1];
            let xs = f32_slice(&x);
            let g = f32_slice(&gamma);
            let n = xs.len() / h.max(1);
            let mut y = vec![0f32; xs.len()];
            let mut rstd = vec![0f32; n];
            // As transformers: the normalised row is rounded to the input type before the product.
            let round = rounding(dtype);
            par_rows(&mut y, h, &mut rstd, |i, yr, r| {
                let xr = &xs[i * h..(i + 1) * h];
                let ms = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
                let s = 1.0 / (ms + eps as f32).sqrt();
                *r = s;
                for ((o, xv), gv) in yr.iter_mut().zip(xr).zip(g.iter()) {
                    *o = gv * round(xv * s);
                }
            });
            (store(y, shape, dtype), f32_tensor(rstd, [n].into()))
        }

        fn rms_norm_backward(
            x: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            rstd: FloatTensor<Self>,
            dy: FloatTensor<Self>,
            gamma_grad: bool,
        ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
            if !is_f32(&[&x, &gamma, &dy]) || rstd.dtype() != DType::F32 {
                return tensor_ops::backward::<Self>(x, gamma, rstd, dy, gamma_grad);
            }
            let (shape, dtype, gdtype) = (x.layout().shape().clone(), x.dtype(), gamma.dtype());
            let h = shape[1];
            let (xs, g, r, dys) = (
                f32_slice(&x),
                f32_slice(&gamma),
                f32_slice(&rstd),
                f32_slice(&dy),
            );
            let mut dx = vec![0f32; xs.len()];
            let mut unused = vec![0f32; r.len()];
            par_rows(&mut dx, h, &mut unused, |i, dxr, _| {
                let (xr, dyr, s) = (&xs[i * h..(i + 1) * h], &dys[i * h..(i + 1) * h], r[i]);
                let dot = xr
                    .iter()
                    .zip(dyr)
                    .zip(g.iter())
                    .map(|((xv, d), gv)| d * gv * xv * s)
                    .sum::<f32>()
                    / h as f32;
                for (((o, xv), d), gv) in dxr.iter_mut().zip(xr).zip(dyr).zip(g.iter()) {
                    *o = s * (d * gv - xv * s * dot);
                }
            });
            let dgamma = gamma_grad.then(|| {
                let n = r.len();
                let partial: Vec<f64> = (0..n)
                    .into_par_iter()
                    .fold(
                        || vec![0f64; h],
                        |mut acc, i| {
                            let (xr, dyr) = (&xs[i * h..(i + 1) * h], &dys[i * h..(i + 1) * h]);
                            for ((a, xv), d) in acc.iter_mut().zip(xr).zip(dyr) {
                                *a += (d * xv * r[i]) as f64;
                            }
                            acc
                        },
                    )
                    .reduce(
                        || vec![0f64; h],
                        |mut a, b| {
                            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                            a
                        },
                    );
                store(
                    partial.into_iter().map(|v| v as f32).collect(),
                    [h].into(),
                    gdtype,
                )
            });
            (store(dx, shape, dtype), dgamma)
        }
    }
}

#[cfg(feature = "cube")]
mod cube {
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
    use burn_fusion::{Fusion, FusionBackend};

    use super::RmsNormBackend;

    // The tensor-op default methods serve the GPU backends.
    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> RmsNormBackend
        for CubeBackend<R, F, I, BT>
    {
    }

    impl<B: FusionBackend> RmsNormBackend for Fusion<B> {}
}
