//! `x·W` for a frozen weight `W`: the base projections under LoRA, whose weights never train. As
//! one operation it is differentiable with respect to `x` only — the backward is `dy·Wᵀ`, the same
//! operation on the transposed view, and `W` is the model's own tensor, not a copy. On the CPU
//! (burn-flex) the rows of all sequences go through one gemm call on every core, written straight
//! into the output: burn-flex's matmul zero-fills each output and then copies it into an aligned
//! buffer on the calling thread, and runs a 3-D input against a broadcast weight one batch at a time.

use burn::{
    backend::{
        Autodiff,
        autodiff::{
            checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
            grads::Gradients,
            ops::{Backward, Ops, OpsKind},
        },
    },
    tensor::{Tensor, TensorPrimitive, backend::Backend, ops::FloatTensor},
};

/// The frozen-weight product on rows.
pub trait FrozenMatmulBackend: Backend {
    /// `x·w` for `x` `[rows, in]` and `w` `[in, out]` (any strides: a transposed view is read in
    /// place). The default implementation is the backend's matmul.
    fn frozen_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(x, w)
    }
}

/// `x·w` over the last dimension of `x` `[…, in]`, for `w` `[in, out]` that does not train: no
/// gradient is computed for `w` (where `w` does require one, this is a plain matmul).
pub fn frozen_matmul<B: FrozenMatmulBackend, const D: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, 2>,
) -> Tensor<B, D> {
    let mut dims = x.dims();
    let [d_in, d_out] = w.dims();
    assert_eq!(
        dims[D - 1],
        d_in,
        "frozen_matmul: x [.., {}] against a weight [{d_in}, {d_out}]",
        dims[D - 1]
    );
    let rows = x.shape().num_elements() / d_in.max(1);
    let x = x.reshape([rows, d_in]).into_primitive().tensor();
    let y = B::frozen_matmul(x, w.into_primitive().tensor());
    dims[D - 1] = d_out;
    Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(y)).reshape(dims)
}

#[cfg(feature = "ndarray")]
impl FrozenMatmulBackend for burn::backend::NdArray {}

/// The backward of `x·W` with respect to `x` alone: `dy·Wᵀ`.
#[derive(Debug)]
struct FrozenMatmulBackward;

impl<B: FrozenMatmulBackend> Backward<B, 1> for FrozenMatmulBackward {
    /// The weight `[in, out]`.
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_parent] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        if let Some(p) = x_parent {
            let wt = B::float_transpose(ops.state);
            grads.register::<B>(p.id, B::frozen_matmul(dy, wt));
        }
    }
}

impl<B: FrozenMatmulBackend, C: CheckpointStrategy> FrozenMatmulBackend for Autodiff<B, C> {
    fn frozen_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        if !w.node.requirement.is_none() {
            // A weight that trains: the full matmul, with its gradient.
            return <Self as burn::tensor::ops::FloatTensorOps<Self>>::float_matmul(x, w);
        }
        match FrozenMatmulBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::frozen_matmul(x.primitive, w.primitive.clone());
                prep.finish(w.primitive, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::frozen_matmul(x.primitive, w.primitive)),
        }
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::tensor::{
        DType,
        ops::{FloatTensor, FloatTensorOps},
    };
    use burn_flex::{Flex, FlexTensor};

    use rayon::prelude::*;

    use super::FrozenMatmulBackend;
    use crate::cpu::{extent, f32_tensor};

    /// `(storage, start offset, row stride, column stride)` of a 2-D f32 tensor with non-negative
    /// strides; `None` for anything else.
    fn strided(t: &FlexTensor) -> Option<(&[f32], usize, usize, usize)> {
        let strides = t.layout().strides();
        if t.dtype() != DType::F32 || strides.len() != 2 || strides.iter().any(|&s| s < 0) {
            return None;
        }
        Some((
            t.storage::<f32>(),
            t.layout().start_offset(),
            strides[0] as usize,
            strides[1] as usize,
        ))
    }

    /// One gemm over all rows on rayon's pool, into an output that is never zero-filled or copied;
    /// f16/bf16 and unusual layouts take burn-flex's matmul.
    impl FrozenMatmulBackend for Flex {
        fn frozen_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
            let ([m, k], [k2, n]) = (dims2(&x), dims2(&w));
            let (Some((xs, xo, x_rs, x_cs)), Some((ws, wo, w_rs, w_cs))) =
                (strided(&x), strided(&w))
            else {
                return Self::float_matmul(x, w);
            };
            assert_eq!(k, k2, "frozen_matmul: [{m}, {k}] · [{k2}, {n}]");
            assert!(
                xo + extent(m, k, x_rs, x_cs) <= xs.len(),
                "frozen_matmul: x out of bounds"
            );
            assert!(
                wo + extent(k, n, w_rs, w_cs) <= ws.len(),
                "frozen_matmul: w out of bounds"
            );
            if k == 0 {
                return f32_tensor(vec![0.0; m * n], [m, n].into());
            }
            // A weight read through a transposed view (`[out, in]` storage used as `[in, out]`)
            // is first copied into row-major order: gemm packs it slowly in place, and the copy
            // (k·n) is small against the product (m·k·n).
            let row_major;
            let (ws, wo, w_rs, w_cs) = if w_rs == 1 && w_cs != 1 && m >= MIN_ROWS_TO_REORDER {
                row_major = row_major_copy(&ws[wo..], k, n, w_cs);
                (&row_major[..], 0, n, 1)
            } else {
                (ws, wo, w_rs, w_cs)
            };
            // Below ~7 M multiply-adds one thread is faster than waking the pool (burn-flex's rule).
            let parallelism = if m * n * k >= 192 * 192 * 192 {
                gemm::Parallelism::Rayon(0)
            } else {
                gemm::Parallelism::None
            };
            let mut out: Vec<f32> = Vec::with_capacity(m * n);
            // SAFETY: every element gemm reads lies within `xs` / `ws` (checked above); it writes
            // each of the m·n output elements once without reading them (`read_dst = false`), so
            // the spare capacity is fully initialised before `set_len`.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    xs.as_ptr().add(xo),
                    x_cs as isize,
                    x_rs as isize,
                    ws.as_ptr().add(wo),
                    w_cs as isize,
                    w_rs as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                );
                out.set_len(m * n);
            }
            f32_tensor(out, [m, n].into())
        }
    }

    /// Rows of `x` from which a transposed weight is reordered before the product.
    const MIN_ROWS_TO_REORDER: usize = 128;

    /// The `[k, n]` matrix whose element `(i, j)` is `src[i + j · col_stride]`, row-major, built
    /// in parallel blocks of rows.
    fn row_major_copy(src: &[f32], k: usize, n: usize, col_stride: usize) -> Vec<f32> {
        let mut out = vec![0f32; k * n];
        const ROWS: usize = 32;
        out.par_chunks_mut(ROWS * n)
            .enumerate()
            .for_each(|(b, block)| {
                let i0 = b * ROWS;
                let rows = block.len() / n;
                for j in 0..n {
                    let col = &src[j * col_stride + i0..][..rows];
                    for (r, &v) in col.iter().enumerate() {
                        block[r * n + j] = v;
                    }
                }
            });
        out
    }

    fn dims2(t: &FlexTensor) -> [usize; 2] {
        let s = t.layout().shape();
        assert_eq!(s.num_dims(), 2, "frozen_matmul takes 2-D operands");
        [s[0], s[1]]
    }
}

#[cfg(feature = "cube")]
mod cube {
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
    use burn_fusion::{Fusion, FusionBackend};

    use super::FrozenMatmulBackend;

    // The GPU backends' own matmul.
    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FrozenMatmulBackend
        for CubeBackend<R, F, I, BT>
    {
    }

    impl<B: FusionBackend> FrozenMatmulBackend for Fusion<B> {}
}
