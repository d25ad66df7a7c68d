//! The low-rank update of a LoRA layer as one operation: `y + scale · (x·A)·B` for the base layer's
//! output `y` `[N, out]`, the adapter input `x` `[N, in]` and the factors `A` `[in, r]`, `B`
//! `[r, out]`. Its backward pass keeps only `x` and the small `x·A` `[N, r]`; on the CPU both
//! directions run as parallel passes over blocks of rows, so the skinny products (rank 8 or 16)
//! that a general matmul would run on one thread use every core.

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
        Tensor, TensorPrimitive,
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

/// Which gradients of the LoRA update to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraGrads {
    /// Of the adapter input `x`.
    pub x: bool,
    /// Of the down-projection `A`.
    pub a: bool,
    /// Of the up-projection `B`.
    pub b: bool,
}

/// The LoRA update operations, on rows.
pub trait LoraBackend: Backend {
    /// `(y + scale · h·B, h)` with `h = x·A`. The default implementation uses tensor operations.
    fn lora_forward(
        y: FloatTensor<Self>,
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        tensor_ops::forward::<Self>(y, x, a, b, scale)
    }

    /// `(dx, dA, dB)` for the upstream gradient `dout` (the gradient of `y` is `dout` itself):
    /// `dh = scale · dout·Bᵀ`, `dx = dh·Aᵀ`, `dA = xᵀ·dh`, `dB = scale · hᵀ·dout`.
    #[allow(clippy::type_complexity)]
    fn lora_backward(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        h: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        scale: f64,
        want: LoraGrads,
    ) -> (
        Option<FloatTensor<Self>>,
        Option<FloatTensor<Self>>,
        Option<FloatTensor<Self>>,
    ) {
        tensor_ops::backward::<Self>(x, a, b, h, dout, scale, want)
    }
}

/// The operations written with tensor operations, for any backend.
pub(crate) mod tensor_ops {
    use super::*;

    pub fn forward<B: Backend>(
        y: FloatTensor<B>,
        x: FloatTensor<B>,
        a: FloatTensor<B>,
        b: FloatTensor<B>,
        scale: f64,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let (y, x, a, b): (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>) =
            (float(y), float(x), float(a), float(b));
        let h = x.matmul(a);
        (prim(y + h.clone().matmul(b) * scale), prim(h))
    }

    #[allow(clippy::type_complexity)]
    pub fn backward<B: Backend>(
        x: FloatTensor<B>,
        a: FloatTensor<B>,
        b: FloatTensor<B>,
        h: FloatTensor<B>,
        dout: FloatTensor<B>,
        scale: f64,
        want: LoraGrads,
    ) -> (
        Option<FloatTensor<B>>,
        Option<FloatTensor<B>>,
        Option<FloatTensor<B>>,
    ) {
        let (x, a, b, h, d): (
            Tensor<B, 2>,
            Tensor<B, 2>,
            Tensor<B, 2>,
            Tensor<B, 2>,
            Tensor<B, 2>,
        ) = (float(x), float(a), float(b), float(h), float(dout));
        let dh = d.clone().matmul(b.transpose()) * scale;
        let db = want.b.then(|| prim(h.transpose().matmul(d) * scale));
        let da = want.a.then(|| prim(x.transpose().matmul(dh.clone())));
        let dx = want.x.then(|| prim(dh.matmul(a.transpose())));
        (dx, da, db)
    }
}

/// `y + scale · (x·A)·B` over the last dimension: `y` `[…, out]`, `x` `[…, in]`, `a` `[in, r]`,
/// `b` `[r, out]`; differentiable with respect to all four.
pub fn lora_update<B: LoraBackend, const D: usize>(
    y: Tensor<B, D>,
    x: Tensor<B, D>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    scale: f64,
) -> Tensor<B, D> {
    let dims = y.dims();
    let (d_in, d_out) = (x.dims()[D - 1], dims[D - 1]);
    let rows = y.shape().num_elements() / d_out.max(1);
    let (out, _) = B::lora_forward(
        prim(y.reshape([rows, d_out])),
        prim(x.reshape([rows, d_in])),
        prim(a),
        prim(b),
        scale,
    );
    float::<B, 2>(out).reshape(dims)
}

#[cfg(feature = "ndarray")]
impl LoraBackend for burn::backend::NdArray {}

#[derive(Debug)]
struct LoraBackward;

impl<B: LoraBackend> Backward<B, 4> for LoraBackward {
    /// `x`, `A`, `B` by node, `h = x·A`, and the scale.
    type State = (NodeId, NodeId, NodeId, FloatTensor<B>, f64);

    fn backward(
        self,
        ops: Ops<Self::State, 4>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [y_parent, x_parent, a_parent, b_parent] = ops.parents;
        let dout = grads.consume::<B>(&ops.node);
        let (x_id, a_id, b_id, h, scale) = ops.state;
        let x: FloatTensor<B> = checkpointer.retrieve_node_output(x_id);
        let a: FloatTensor<B> = checkpointer.retrieve_node_output(a_id);
        let b: FloatTensor<B> = checkpointer.retrieve_node_output(b_id);
        let want = LoraGrads {
            x: x_parent.is_some(),
            a: a_parent.is_some(),
            b: b_parent.is_some(),
        };
        let (dx, da, db) = B::lora_backward(x, a, b, h, dout.clone(), scale, want);
        if let Some(p) = y_parent {
            grads.register::<B>(p.id, dout);
        }
        for (parent, grad) in [(x_parent, dx), (a_parent, da), (b_parent, db)] {
            if let (Some(p), Some(g)) = (parent, grad) {
                grads.register::<B>(p.id, g);
            }
        }
    }
}

impl<B: LoraBackend, C: CheckpointStrategy> LoraBackend for Autodiff<B, C> {
    fn lora_forward(
        y: FloatTensor<Self>,
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let lift = <Self as AutodiffBackend>::from_inner;
        match LoraBackward
            .prepare::<C>([
                y.node.clone(),
                x.node.clone(),
                a.node.clone(),
                b.node.clone(),
            ])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let ids = (
                    prep.checkpoint(&x),
                    prep.checkpoint(&a),
                    prep.checkpoint(&b),
                );
                let (out, h) =
                    B::lora_forward(y.primitive, x.primitive, a.primitive, b.primitive, scale);
                (
                    prep.finish((ids.0, ids.1, ids.2, h.clone(), scale), out),
                    lift(h),
                )
            }
            OpsKind::UnTracked(prep) => {
                let (out, h) =
                    B::lora_forward(y.primitive, x.primitive, a.primitive, b.primitive, scale);
                (prep.finish(out), lift(h))
            }
        }
    }

    fn lora_backward(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        h: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        scale: f64,
        want: LoraGrads,
    ) -> (
        Option<FloatTensor<Self>>,
        Option<FloatTensor<Self>>,
        Option<FloatTensor<Self>>,
    ) {
        let lift = <Self as AutodiffBackend>::from_inner;
        let (dx, da, db) = B::lora_backward(
            x.primitive,
            a.primitive,
            b.primitive,
            h.primitive,
            dout.primitive,
            scale,
            want,
        );
        (dx.map(lift), da.map(lift), db.map(lift))
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::tensor::ops::FloatTensor;
    use burn_flex::Flex;
    use rayon::prelude::*;

    use super::{LoraBackend, LoraGrads, tensor_ops};
    use crate::cpu::{SharedOut, f32_slice, is_f32, is_unique_f32, matmul, store};

    /// Rows per parallel task.
    const ROWS: usize = 64;

    fn blocks(n: usize) -> impl ParallelIterator<Item = (usize, usize)> {
        (0..n.div_ceil(ROWS))
            .into_par_iter()
            .map(move |b| (b * ROWS, ROWS.min(n - b * ROWS)))
    }

    /// Sums per-block partial products `f(r0, rows, acc)` into one `len`-element accumulator.
    fn reduce(
        n: usize,
        len: usize,
        f: impl Fn(usize, usize, &mut [f32]) + Sync + Send,
    ) -> Vec<f32> {
        blocks(n)
            .fold(
                || vec![0f32; len],
                |mut acc, (r0, rows)| {
                    f(r0, rows, &mut acc);
                    acc
                },
            )
            .reduce(
                || vec![0f32; len],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                    a
                },
            )
    }

    /// Parallel over blocks of rows; f32 arithmetic whatever the input type.
    impl LoraBackend for Flex {
        fn lora_forward(
            y: FloatTensor<Self>,
            x: FloatTensor<Self>,
            a: FloatTensor<Self>,
            b: FloatTensor<Self>,
            scale: f64,
        ) -> (FloatTensor<Self>, FloatTensor<Self>) {
            if !is_f32(&[&y, &x, &a, &b]) {
                return tensor_ops::forward::<Self>(y, x, a, b, scale);
            }
            let (yshape, dtype) = (y.layout().shape().clone(), y.dtype());
            let (n, d_out) = (yshape[0], yshape[1]);
            let (d_in, r) = (x.layout().shape()[1], a.layout().shape()[1]);
            let (xs, as_, bs) = (f32_slice(&x), f32_slice(&a), f32_slice(&b));
            // The base output is updated in place when nothing else holds it (the usual case: the
            // frozen product just made it), which saves a serial copy of `[n, d_out]`.
            let mut y = y;
            let in_place = is_unique_f32(&y, n * d_out);
            let mut copy = if in_place {
                Vec::new()
            } else {
                f32_slice(&y).into_owned()
            };
            let out: &mut [f32] = if in_place {
                y.storage_mut::<f32>()
            } else {
                &mut copy
            };
            let mut h = vec![0f32; n * r];
            let (out_w, h_w) = (SharedOut::new(out), SharedOut::new(&mut h));
            blocks(n).for_each(|(r0, rows)| {
                let mut hb = vec![0f32; rows * r];
                // h = x·A, out += scale · h·B
                matmul(
                    rows,
                    r,
                    d_in,
                    hb.as_mut_slice(),
                    r,
                    false,
                    &xs[r0 * d_in..],
                    d_in,
                    1,
                    &as_,
                    r,
                    1,
                    1.0,
                );
                matmul(
                    rows,
                    d_out,
                    r,
                    out_w.at(r0 * d_out),
                    d_out,
                    true,
                    &hb,
                    r,
                    1,
                    &bs,
                    d_out,
                    1,
                    scale as f32,
                );
                // SAFETY: rows r0.. belong to this task alone.
                unsafe { h_w.write_slice(r0 * r, &hb) };
            });
            let out = if in_place {
                y
            } else {
                store(copy, yshape, dtype)
            };
            (out, store(h, [n, r].into(), dtype))
        }

        fn lora_backward(
            x: FloatTensor<Self>,
            a: FloatTensor<Self>,
            b: FloatTensor<Self>,
            h: FloatTensor<Self>,
            dout: FloatTensor<Self>,
            scale: f64,
            want: LoraGrads,
        ) -> (
            Option<FloatTensor<Self>>,
            Option<FloatTensor<Self>>,
            Option<FloatTensor<Self>>,
        ) {
            if !is_f32(&[&x, &a, &b, &h, &dout]) {
                return tensor_ops::backward::<Self>(x, a, b, h, dout, scale, want);
            }
            let (xshape, dtype) = (x.layout().shape().clone(), x.dtype());
            let (n, d_in) = (xshape[0], xshape[1]);
            let (r, d_out) = (a.layout().shape()[1], b.layout().shape()[1]);
            let (xs, as_, bs) = (f32_slice(&x), f32_slice(&a), f32_slice(&b));
            let (hs, ds) = (f32_slice(&h), f32_slice(&dout));
            let s = scale as f32;
            // dh = scale · dout·Bᵀ, [n, r]: small, computed once and shared by dx and dA.
            let mut dh = vec![0f32; n * r];
            let dh_w = SharedOut::new(&mut dh);
            blocks(n).for_each(|(r0, rows)| {
                matmul(
                    rows,
                    r,
                    d_out,
                    dh_w.at(r0 * r),
                    r,
                    false,
                    &ds[r0 * d_out..],
                    d_out,
                    1,
                    &bs,
                    1,
                    d_out,
                    s,
                );
            });
            let dx = want.x.then(|| {
                let mut dx = vec![0f32; n * d_in];
                let dx_w = SharedOut::new(&mut dx);
                blocks(n).for_each(|(r0, rows)| {
                    matmul(
                        rows,
                        d_in,
                        r,
                        dx_w.at(r0 * d_in),
                        d_in,
                        false,
                        &dh[r0 * r..],
                        r,
                        1,
                        &as_,
                        1,
                        r,
                        1.0,
                    );
                });
                store(dx, xshape.clone(), dtype)
            });
            let da = want.a.then(|| {
                let sum = reduce(n, d_in * r, |r0, rows, acc| {
                    // dA += x_blkᵀ · dh_blk
                    matmul(
                        d_in,
                        r,
                        rows,
                        acc,
                        r,
                        true,
                        &xs[r0 * d_in..],
                        1,
                        d_in,
                        &dh[r0 * r..],
                        r,
                        1,
                        1.0,
                    );
                });
                store(sum, [d_in, r].into(), a.dtype())
            });
            let db = want.b.then(|| {
                let sum = reduce(n, r * d_out, |r0, rows, acc| {
                    // dB += scale · h_blkᵀ · dout_blk
                    matmul(
                        r,
                        d_out,
                        rows,
                        acc,
                        d_out,
                        true,
                        &hs[r0 * r..],
                        1,
                        r,
                        &ds[r0 * d_out..],
                        d_out,
                        1,
                        s,
                    );
                });
                store(sum, [r, d_out].into(), b.dtype())
            });
            (dx, da, db)
        }
    }
}

#[cfg(feature = "cube")]
mod cube {
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
    use burn_fusion::{Fusion, FusionBackend};

    use super::LoraBackend;

    // The tensor-op default methods serve the GPU backends.
    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> LoraBackend
        for CubeBackend<R, F, I, BT>
    {
    }

    impl<B: FusionBackend> LoraBackend for Fusion<B> {}
}
