//! Rotary position embeddings in Hugging Face's rotate-half layout on token-major rows
//! `[tokens, heads · head_dim]`: within every head, dimension `i` pairs with `i + head_dim/2`,
//! `y₁ = x₁·cos − x₂·sin`, `y₂ = x₂·cos + x₁·sin`. The rotation is orthogonal, so its backward pass is
//! the same operation with the angle negated; nothing but the tables is kept.

use burn::{
    backend::{
        Autodiff,
        autodiff::{
            checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
            grads::Gradients,
            ops::{Backward, Ops, OpsKind},
        },
    },
    tensor::{DType, Tensor, TensorPrimitive, backend::Backend, ops::FloatTensor},
};

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// The rotary embedding on token-major rows.
pub trait RopeBackend: Backend {
    /// Rotates every head of `x` `[T, heads · head_dim]` by the angles whose cosines and sines are
    /// `cos`, `sin` `[T, head_dim / 2]` (f32); with `inverse`, by the negated angles. The default
    /// implementation uses tensor operations.
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        heads: usize,
        inverse: bool,
    ) -> FloatTensor<Self> {
        tensor_ops::rope::<Self>(x, cos, sin, heads, inverse)
    }
}

/// The operation written with tensor operations, for any backend.
pub(crate) mod tensor_ops {
    use super::*;

    pub fn rope<B: Backend>(
        x: FloatTensor<B>,
        cos: FloatTensor<B>,
        sin: FloatTensor<B>,
        heads: usize,
        inverse: bool,
    ) -> FloatTensor<B> {
        let x: Tensor<B, 2> = float(x);
        let dtype = x.dtype();
        let [t, width] = x.dims();
        let hd = width / heads.max(1);
        let half = hd / 2;
        let x = x.cast(DType::F32).reshape([t, heads, hd]);
        let c = float::<B, 2>(cos).cast(DType::F32).reshape([t, 1, half]);
        let mut s = float::<B, 2>(sin).cast(DType::F32).reshape([t, 1, half]);
        if inverse {
            s = s.neg();
        }
        let x1 = x.clone().narrow(2, 0, half);
        let x2 = x.narrow(2, half, half);
        let y1 = x1.clone() * c.clone() - x2.clone() * s.clone();
        let y2 = x2 * c + x1 * s;
        prim(Tensor::cat(vec![y1, y2], 2).reshape([t, width]).cast(dtype))
    }
}

/// Applies the rotary embedding to `x` `[T, heads · head_dim]` with tables `[T, head_dim / 2]`;
/// differentiable with respect to `x`.
pub fn rope<B: RopeBackend>(
    x: Tensor<B, 2>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    heads: usize,
) -> Tensor<B, 2> {
    float(B::rope(prim(x), prim(cos), prim(sin), heads, false))
}

#[cfg(feature = "ndarray")]
impl RopeBackend for burn::backend::NdArray {}

#[derive(Debug)]
struct RopeBackward;

impl<B: RopeBackend> Backward<B, 1> for RopeBackward {
    /// The tables and the head count.
    type State = (FloatTensor<B>, FloatTensor<B>, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (cos, sin, heads) = ops.state;
        if let Some(p) = parent {
            grads.register::<B>(p.id, B::rope(dy, cos, sin, heads, true));
        }
    }
}

impl<B: RopeBackend, C: CheckpointStrategy> RopeBackend for Autodiff<B, C> {
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        heads: usize,
        inverse: bool,
    ) -> FloatTensor<Self> {
        let (cos, sin) = (cos.primitive, sin.primitive);
        match RopeBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::rope(x.primitive, cos.clone(), sin.clone(), heads, inverse);
                let sin = if inverse {
                    float::<B, 2>(sin).neg().into_primitive().tensor()
                } else {
                    sin
                };
                prep.finish((cos, sin, heads), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rope(x.primitive, cos, sin, heads, inverse)),
        }
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::tensor::ops::FloatTensor;
    use burn_flex::Flex;

    use super::{RopeBackend, tensor_ops};
    use crate::cpu::{f32_slice, is_f32, par_chunks, store};

    /// Tokens in parallel, f32 only (other types take the tensor-op path).
    impl RopeBackend for Flex {
        fn rope(
            x: FloatTensor<Self>,
            cos: FloatTensor<Self>,
            sin: FloatTensor<Self>,
            heads: usize,
            inverse: bool,
        ) -> FloatTensor<Self> {
            if !is_f32(&[&x, &cos, &sin]) {
                return tensor_ops::rope::<Self>(x, cos, sin, heads, inverse);
            }
            let (shape, dtype) = (x.layout().shape().clone(), x.dtype());
            let width = shape[1];
            let hd = width / heads.max(1);
            let half = hd / 2;
            let (xs, c, s) = (f32_slice(&x), f32_slice(&cos), f32_slice(&sin));
            let sign = if inverse { -1.0f32 } else { 1.0 };
            let mut y = vec![0f32; xs.len()];
            par_chunks(&mut y, width, |t, row| {
                let (ct, st) = (&c[t * half..(t + 1) * half], &s[t * half..(t + 1) * half]);
                let xr = &xs[t * width..(t + 1) * width];
                for h in 0..heads {
                    let (x1, x2) = xr[h * hd..(h + 1) * hd].split_at(half);
                    let (y1, y2) = row[h * hd..(h + 1) * hd].split_at_mut(half);
                    for i in 0..half {
                        let (cv, sv) = (ct[i], sign * st[i]);
                        y1[i] = x1[i] * cv - x2[i] * sv;
                        y2[i] = x2[i] * cv + x1[i] * sv;
                    }
                }
            });
            store(y, shape, dtype)
        }
    }
}

#[cfg(feature = "cube")]
mod cube {
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
    use burn_fusion::{Fusion, FusionBackend};

    use super::RopeBackend;

    // The tensor-op default methods serve the GPU backends.
    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> RopeBackend
        for CubeBackend<R, F, I, BT>
    {
    }

    impl<B: FusionBackend> RopeBackend for Fusion<B> {}
}
