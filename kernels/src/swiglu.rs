//! The SwiGLU gate of Llama's MLP, `silu(gate) ∘ up`, as one operation with a hand-written
//! backward: only `gate` and `up` are kept (autodiff would also keep `sigmoid(gate)` and
//! `silu(gate)`), and on the CPU both directions are one parallel pass in f32 arithmetic.

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
        activation::{sigmoid, silu},
        backend::{AutodiffBackend, Backend},
        ops::FloatTensor,
    },
};

fn float<B: Backend>(t: FloatTensor<B>) -> Tensor<B, 1> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// The SwiGLU operations on tensors of one shape (viewed flat).
pub trait SwiGluBackend: Backend {
    /// `silu(gate) ∘ up`. The default implementation uses tensor operations.
    fn swiglu_forward(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        tensor_ops::forward::<Self>(gate, up)
    }

    /// `(dgate, dup)` for upstream `dy`: `dgate = dy ∘ up ∘ σ(g)·(1 + g·(1 − σ(g)))`,
    /// `dup = dy ∘ silu(g)`.
    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        tensor_ops::backward::<Self>(gate, up, dy)
    }
}

/// The operations written with tensor operations, for any backend.
pub(crate) mod tensor_ops {
    use super::*;

    pub fn forward<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
        let shape = burn::tensor::TensorMetadata::shape(&gate);
        let n = shape.num_elements();
        let g = float::<B>(B::float_reshape(gate, [n].into()));
        let dtype = g.dtype();
        let u = float::<B>(B::float_reshape(up, [n].into()));
        let y = silu(g.cast(DType::F32)) * u.cast(DType::F32);
        B::float_reshape(prim(y.cast(dtype)), shape)
    }

    pub fn backward<B: Backend>(
        gate: FloatTensor<B>,
        up: FloatTensor<B>,
        dy: FloatTensor<B>,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let shape = burn::tensor::TensorMetadata::shape(&gate);
        let n = shape.num_elements();
        let g = float::<B>(B::float_reshape(gate, [n].into()));
        let dtype = g.dtype();
        let g = g.cast(DType::F32);
        let u = float::<B>(B::float_reshape(up, [n].into())).cast(DType::F32);
        let d = float::<B>(B::float_reshape(dy, [n].into())).cast(DType::F32);
        let s = sigmoid(g.clone());
        let silu_g = g.clone() * s.clone();
        let dgate = d.clone() * u * s.clone() * (g * (s.neg() + 1.0) + 1.0);
        let dup = d * silu_g;
        (
            B::float_reshape(prim(dgate.cast(dtype)), shape.clone()),
            B::float_reshape(prim(dup.cast(dtype)), shape),
        )
    }
}

/// `silu(gate) ∘ up`, differentiable with respect to both.
pub fn swiglu<B: SwiGluBackend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(B::swiglu_forward(
        prim(gate),
        prim(up),
    )))
}

#[cfg(feature = "ndarray")]
impl SwiGluBackend for burn::backend::NdArray {}

#[derive(Debug)]
struct SwiGluBackward;

impl<B: SwiGluBackend> Backward<B, 2> for SwiGluBackward {
    type State = (NodeId, NodeId);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [gate_parent, up_parent] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (gate_id, up_id) = ops.state;
        let gate: FloatTensor<B> = checkpointer.retrieve_node_output(gate_id);
        let up: FloatTensor<B> = checkpointer.retrieve_node_output(up_id);
        let (dgate, dup) = B::swiglu_backward(gate, up, dy);
        if let Some(p) = gate_parent {
            grads.register::<B>(p.id, dgate);
        }
        if let Some(p) = up_parent {
            grads.register::<B>(p.id, dup);
        }
    }
}

impl<B: SwiGluBackend, C: CheckpointStrategy> SwiGluBackend for Autodiff<B, C> {
    fn swiglu_forward(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        match SwiGluBackward
            .prepare::<C>([gate.node.clone(), up.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let gate_id = prep.checkpoint(&gate);
                let up_id = prep.checkpoint(&up);
                let y = B::swiglu_forward(gate.primitive, up.primitive);
                prep.finish((gate_id, up_id), y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::swiglu_forward(gate.primitive, up.primitive))
            }
        }
    }

    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let lift = <Self as AutodiffBackend>::from_inner;
        let (dg, du) = B::swiglu_backward(gate.primitive, up.primitive, dy.primitive);
        (lift(dg), lift(du))
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::tensor::ops::FloatTensor;
    use burn_flex::Flex;

    use super::{SwiGluBackend, tensor_ops};
    use crate::cpu::{f32_slice, is_f32, par_chunks, store};
    use crate::vector_exp::exp_in_place;

    const CHUNK: usize = 16_384;

    /// `out[i] = σ(g[i])`.
    fn sigmoid(g: &[f32], out: &mut [f32]) {
        out.iter_mut().zip(g).for_each(|(o, &x)| *o = -x);
        exp_in_place(out);
        out.iter_mut().for_each(|o| *o = 1.0 / (1.0 + *o));
    }

    /// One parallel pass over the elements, f32 only (other types take the tensor-op path).
    impl SwiGluBackend for Flex {
        fn swiglu_forward(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
            if !is_f32(&[&gate, &up]) {
                return tensor_ops::forward::<Self>(gate, up);
            }
            let (shape, dtype) = (gate.layout().shape().clone(), gate.dtype());
            let (g, u) = (f32_slice(&gate), f32_slice(&up));
            let mut y = vec![0f32; g.len()];
            par_chunks(&mut y, CHUNK, |c, out| {
                let o = c * CHUNK;
                let (g, u) = (&g[o..o + out.len()], &u[o..o + out.len()]);
                sigmoid(g, out);
                for ((y, &gv), &uv) in out.iter_mut().zip(g).zip(u) {
                    *y = gv * *y * uv;
                }
            });
            store(y, shape, dtype)
        }

        fn swiglu_backward(
            gate: FloatTensor<Self>,
            up: FloatTensor<Self>,
            dy: FloatTensor<Self>,
        ) -> (FloatTensor<Self>, FloatTensor<Self>) {
            if !is_f32(&[&gate, &up, &dy]) {
                return tensor_ops::backward::<Self>(gate, up, dy);
            }
            let (shape, dtype) = (gate.layout().shape().clone(), gate.dtype());
            let (g, u, d) = (f32_slice(&gate), f32_slice(&up), f32_slice(&dy));
            let n = g.len();
            // Both gradients in one buffer: `[dgate | dup]`, split after the pass.
            let mut both = vec![0f32; 2 * n];
            let (dg, du) = both.split_at_mut(n);
            rayon::join(
                || {
                    par_chunks(dg, CHUNK, |c, out| {
                        let o = c * CHUNK;
                        let (g, u, d) = (&g[o..o + out.len()], &u[o..o + out.len()], &d[o..]);
                        sigmoid(g, out);
                        for (i, v) in out.iter_mut().enumerate() {
                            let (gv, s) = (g[i], *v);
                            *v = d[i] * u[i] * s * (1.0 + gv * (1.0 - s));
                        }
                    })
                },
                || {
                    par_chunks(du, CHUNK, |c, out| {
                        let o = c * CHUNK;
                        let (g, d) = (&g[o..o + out.len()], &d[o..]);
                        sigmoid(g, out);
                        for (i, v) in out.iter_mut().enumerate() {
                            *v *= d[i] * g[i];
                        }
                    })
                },
            );
            let dup = both.split_off(n);
            (store(both, shape.clone(), dtype), store(dup, shape, dtype))
        }
    }
}

#[cfg(feature = "cube")]
mod cube {
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
    use burn_fusion::{Fusion, FusionBackend};

    use super::SwiGluBackend;

    // The tensor-op default methods serve the GPU backends.
    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> SwiGluBackend
        for CubeBackend<R, F, I, BT>
    {
    }

    impl<B: FusionBackend> SwiGluBackend for Fusion<B> {}
}
