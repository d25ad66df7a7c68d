//! Fused LM head (as in Cut Cross-Entropy): from final hidden states `[N, H]` and the output weight
//! `[V, H]`, each row's target log-prob, log-sum-exp and mean logit, without the `[N, V]` logits.
//!
//! The vocabulary is processed in chunks of `chunk` rows of the weight: each chunk's logits
//! `[N, chunk]` go through the selective log-softmax (a kernel on wgpu/CUDA) and the running
//! log-sum-exp is merged across chunks. The backward pass recomputes each chunk's logits instead of
//! storing them, so the extra memory is O(N · chunk) in both directions, not O(N · V).

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
        DType, Int, Tensor, TensorPrimitive,
        backend::{AutodiffBackend, Backend},
        ops::{FloatTensor, IntTensor},
    },
};

use crate::SelectiveLogSoftmaxBackend;

/// Vocabulary rows per chunk when the caller has no preference: `[N, 4096]` logits at a time.
pub const DEFAULT_CHUNK: usize = 4096;

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// Per chunk: the targets as column indices into the chunk (clamped) and whether they fall in it.
fn local_targets<B: Backend>(
    targets: &Tensor<B, 1, Int>,
    start: usize,
    len: usize,
) -> (Tensor<B, 1, Int>, Tensor<B, 1>) {
    let local = targets.clone().sub_scalar(start as i64);
    let inside = local
        .clone()
        .greater_equal_elem(0)
        .bool_and(local.clone().lower_elem(len as i64));
    (local.clamp(0, len as i64 - 1), inside.float())
}

/// The fused LM head operations. `logp` and `mean_logit` have the hidden states' float type; the
/// running sums and the log-sum-exp are f32 whatever the input type.
pub trait FusedLmHeadBackend: SelectiveLogSoftmaxBackend {
    /// `hidden` `[N, H]`, `weight` `[V, H]`, `targets` `[N]` → (`logp`, `lse` in f32,
    /// `mean_logit`), `[N]` each. The default implementation runs chunked matmuls around the
    /// selective log-softmax.
    fn lm_head_forward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        default_forward::<Self>(hidden, weight, targets, chunk)
    }

    /// Gradients of `Σ grad · logp` with respect to `hidden` and (when asked) `weight`, recomputing
    /// each chunk's logits: `dlogits = g · (onehot(target) − exp(logits − lse))`.
    fn lm_head_backward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        chunk: usize,
        weight_grad: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        default_backward::<Self>(hidden, weight, targets, lse, grad, chunk, weight_grad)
    }
}

/// The forward pass with tensor operations: chunked matmuls around the selective log-softmax.
fn default_forward<B: SelectiveLogSoftmaxBackend>(
    hidden: FloatTensor<B>,
    weight: FloatTensor<B>,
    targets: IntTensor<B>,
    chunk: usize,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let h: Tensor<B, 2> = float(hidden);
    let w: Tensor<B, 2> = float(weight);
    let t = Tensor::<B, 1, Int>::from_primitive(targets);
    let [n, _] = h.dims();
    let v = w.dims()[0];
    let (device, dtype) = (h.device(), h.dtype());
    let f32_zeros = || Tensor::<B, 1>::zeros([n], (&device, DType::F32));
    let mut lse: Option<Tensor<B, 1>> = None;
    let (mut target_logit, mut logit_sum) = (f32_zeros(), f32_zeros());
    for start in (0..v).step_by(chunk.max(1)) {
        let len = chunk.max(1).min(v - start);
        let logits = h
            .clone()
            .matmul(w.clone().narrow(0, start, len).transpose());
        let logits32 = logits.clone().cast(DType::F32);
        logit_sum = logit_sum + logits32.clone().sum_dim(1).reshape([n]);
        let (idx, inside) = local_targets(&t, start, len);
        target_logit = target_logit
            + logits32.gather(1, idx.clone().reshape([n, 1])).reshape([n])
                * inside.cast(DType::F32);
        let (_, lse_c) = B::slsm_forward(prim(logits), idx.into_primitive());
        let lse_c: Tensor<B, 1> = float(lse_c);
        lse = Some(match lse {
            None => lse_c,
            Some(acc) => {
                // log(e^a + e^b) = max + log(e^(a−max) + e^(b−max))
                let m = acc.clone().max_pair(lse_c.clone());
                m.clone() + ((acc - m.clone()).exp() + (lse_c - m).exp()).log()
            }
        });
    }
    let lse = lse.unwrap_or_else(f32_zeros);
    (
        prim((target_logit - lse.clone()).cast(dtype)),
        prim(lse),
        prim((logit_sum / v as f64).cast(dtype)),
    )
}

/// The backward pass with tensor operations, recomputing each chunk's logits.
fn default_backward<B: SelectiveLogSoftmaxBackend>(
    hidden: FloatTensor<B>,
    weight: FloatTensor<B>,
    targets: IntTensor<B>,
    lse: FloatTensor<B>,
    grad: FloatTensor<B>,
    chunk: usize,
    weight_grad: bool,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let h: Tensor<B, 2> = float(hidden);
    let w: Tensor<B, 2> = float(weight);
    let t = Tensor::<B, 1, Int>::from_primitive(targets);
    let lse: Tensor<B, 1> = float(lse);
    let dtype = h.dtype();
    let g: Tensor<B, 1> = float::<B, 1>(grad).cast(dtype);
    let v = w.dims()[0];
    // Chunk contributions are summed in f32.
    let mut dh = Tensor::<B, 2>::zeros(h.dims(), (&h.device(), DType::F32));
    let mut dw = Vec::new();
    for start in (0..v).step_by(chunk.max(1)) {
        let len = chunk.max(1).min(v - start);
        let wc = w.clone().narrow(0, start, len);
        let logits = h.clone().matmul(wc.clone().transpose());
        // Targets relative to the chunk; those in another chunk fall outside `[0, len)` and get
        // no one-hot term. (Adding g at a clamped column and taking it back would cancel
        // catastrophically in f16/bf16.)
        let local = t.clone().sub_scalar(start as i64);
        let d: Tensor<B, 2> = float(B::slsm_backward(
            prim(logits),
            local.into_primitive(),
            prim(lse.clone()),
            prim(g.clone()),
        ));
        if weight_grad {
            dw.push(d.clone().transpose().matmul(h.clone()));
        }
        dh = dh + d.matmul(wc).cast(DType::F32);
    }
    let dw = weight_grad.then(|| prim(Tensor::cat(dw, 0)));
    (prim(dh.cast(dtype)), dw)
}

/// What the fused LM head returns per row.
#[derive(Debug, Clone)]
pub struct LmHeadOutput<B: Backend> {
    /// Log-prob of the row's target (differentiable with respect to hidden states and weight).
    pub logp: Tensor<B, 1>,
    /// Log-sum-exp of the row's logits, in f32 (not differentiable).
    pub lse: Tensor<B, 1>,
    /// Mean logit over the vocabulary (not differentiable; TRL's `logits/*` metrics).
    pub mean_logit: Tensor<B, 1>,
}

/// Target log-probs of `hidden` `[N, H]` under the output `weight` `[V, H]` without the `[N, V]`
/// logits, `chunk` vocabulary rows at a time.
pub fn fused_lm_head<B: FusedLmHeadBackend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    chunk: usize,
) -> LmHeadOutput<B> {
    let (logp, lse, mean) =
        B::lm_head_forward(prim(hidden), prim(weight), targets.into_primitive(), chunk);
    LmHeadOutput {
        logp: float(logp),
        lse: float(lse),
        mean_logit: float(mean),
    }
}

#[cfg(feature = "ndarray")]
impl FusedLmHeadBackend for burn::backend::NdArray {}

#[derive(Debug)]
struct LmHeadBackward;

impl<B: FusedLmHeadBackend> Backward<B, 2> for LmHeadBackward {
    type State = (NodeId, NodeId, IntTensor<B>, FloatTensor<B>, usize);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [hidden_parent, weight_parent] = ops.parents;
        let g = grads.consume::<B>(&ops.node);
        let (hidden_id, weight_id, targets, lse, chunk) = ops.state;
        let hidden: FloatTensor<B> = checkpointer.retrieve_node_output(hidden_id);
        let weight: FloatTensor<B> = checkpointer.retrieve_node_output(weight_id);
        let (dh, dw) = B::lm_head_backward(
            hidden,
            weight,
            targets,
            lse,
            g,
            chunk,
            weight_parent.is_some(),
        );
        if let Some(p) = hidden_parent {
            grads.register::<B>(p.id, dh);
        }
        if let (Some(p), Some(dw)) = (weight_parent, dw) {
            grads.register::<B>(p.id, dw);
        }
    }
}

impl<B: FusedLmHeadBackend, C: CheckpointStrategy> FusedLmHeadBackend for Autodiff<B, C> {
    fn lm_head_forward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let lift = <Self as AutodiffBackend>::from_inner;
        match LmHeadBackward
            .prepare::<C>([hidden.node.clone(), weight.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let hid = prep.checkpoint(&hidden);
                let wid = prep.checkpoint(&weight);
                let (logp, lse, mean) =
                    B::lm_head_forward(hidden.primitive, weight.primitive, targets.clone(), chunk);
                let state = (hid, wid, targets, lse.clone(), chunk);
                (prep.finish(state, logp), lift(lse), lift(mean))
            }
            OpsKind::UnTracked(prep) => {
                let (logp, lse, mean) =
                    B::lm_head_forward(hidden.primitive, weight.primitive, targets, chunk);
                (prep.finish(logp), lift(lse), lift(mean))
            }
        }
    }

    fn lm_head_backward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        chunk: usize,
        weight_grad: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        let lift = <Self as AutodiffBackend>::from_inner;
        let (dh, dw) = B::lm_head_backward(
            hidden.primitive,
            weight.primitive,
            targets,
            lse.primitive,
            grad.primitive,
            chunk,
            weight_grad,
        );
        (lift(dh), dw.map(lift))
    }
}

#[cfg(feature = "cube")]
mod cube {
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
    use burn_fusion::{Fusion, FusionBackend};

    use super::FusedLmHeadBackend;
    use crate::SelectiveLogSoftmaxBackend;

    // The chunk loop is plain tensor operations around the selective log-softmax kernel, so the
    // default methods serve the GPU backends too.
    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FusedLmHeadBackend
        for CubeBackend<R, F, I, BT>
    {
    }

    impl<B: FusionBackend + SelectiveLogSoftmaxBackend> FusedLmHeadBackend for Fusion<B> {}
}

#[cfg(feature = "flex")]
mod flex {
    use burn::tensor::ops::{FloatTensor, IntTensor};
    use burn_flex::Flex;
    use rayon::prelude::*;

    use super::FusedLmHeadBackend;
    use burn::tensor::DType;

    use crate::cpu::{SharedOut, f32_slice, f32_tensor, is_f32, matmul, rounding, store};

    /// Rows per parallel task: a task's logits `[ROWS, chunk]` stay in cache.
    const ROWS: usize = 32;

    fn int_targets(t: &IntTensor<Flex>) -> Vec<i64> {
        t.to_contiguous()
            .into_data()
            .convert::<i64>()
            .into_vec::<i64>()
            .unwrap_or_default()
    }

    /// One block's logits against one vocabulary chunk, `out = h_blk · W_cᵀ` (`[rows, len]`): the
    /// forward computes them, the backward recomputes them rather than keeping `[N, V]`.
    fn block_logits(
        out: &mut [f32],
        h_blk: &[f32],
        w_chunk: &[f32],
        rows: usize,
        len: usize,
        h: usize,
    ) {
        matmul(
            rows, len, h, out, len, false, h_blk, h, 1, w_chunk, 1, h, 1.0,
        );
    }

    /// Each task runs blocks of `ROWS` rows through every vocabulary chunk: the chunk's logits by
    /// gemm, then an online log-sum-exp, the target's logit and the running logit sum, so neither
    /// `[N, V]` nor `[N, chunk]` is ever allocated. f32 arithmetic whatever the input type.
    impl FusedLmHeadBackend for Flex {
        fn lm_head_forward(
            hidden: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            targets: IntTensor<Self>,
            chunk: usize,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            if !is_f32(&[&hidden, &weight]) {
                return super::default_forward::<Self>(hidden, weight, targets, chunk);
            }
            let (hshape, dtype) = (hidden.layout().shape().clone(), hidden.dtype());
            let (n, h) = (hshape[0], hshape[1]);
            let v = weight.layout().shape()[0];
            let chunk = chunk.clamp(1, v.max(1));
            let (hs, ws, ts) = (
                f32_slice(&hidden),
                f32_slice(&weight),
                int_targets(&targets),
            );
            let round = rounding(dtype);
            let (mut logp, mut lse, mut mean) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            let outs = (
                SharedOut::new(&mut logp),
                SharedOut::new(&mut lse),
                SharedOut::new(&mut mean),
            );
            (0..n.div_ceil(ROWS)).into_par_iter().for_each(|b| {
                let (r0, rows) = (b * ROWS, ROWS.min(n - b * ROWS));
                let mut logits = vec![0f32; rows * chunk];
                let (mut m, mut s) = (vec![f32::NEG_INFINITY; rows], vec![0f32; rows]);
                let (mut target, mut sum) = (vec![0f32; rows], vec![0f64; rows]);
                for c0 in (0..v).step_by(chunk) {
                    let len = chunk.min(v - c0);
                    let lg = &mut logits[..rows * len];
                    block_logits(lg, &hs[r0 * h..], &ws[c0 * h..], rows, len, h);
                    // Logits in the input type, as the matmul of the tensor-op path gives them.
                    if dtype != DType::F32 {
                        lg.iter_mut().for_each(|x| *x = round(*x));
                    }
                    for (i, row) in lg.chunks(len).enumerate() {
                        let rm = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let nm = m[i].max(rm);
                        let acc: f32 = row.iter().map(|x| (x - nm).exp()).sum();
                        s[i] = s[i] * (m[i] - nm).exp() + acc;
                        m[i] = nm;
                        sum[i] += row.iter().map(|&x| x as f64).sum::<f64>();
                        let t = ts[r0 + i];
                        if t >= c0 as i64 && t < (c0 + len) as i64 {
                            target[i] = row[t as usize - c0];
                        }
                    }
                }
                for i in 0..rows {
                    let l = m[i] + s[i].ln();
                    // SAFETY: rows r0.. belong to this task alone.
                    unsafe {
                        outs.0.write(r0 + i, target[i] - l);
                        outs.1.write(r0 + i, l);
                        outs.2.write(r0 + i, (sum[i] / v as f64) as f32);
                    }
                }
            });
            (
                store(logp, [n].into(), dtype),
                f32_tensor(lse, [n].into()),
                store(mean, [n].into(), dtype),
            )
        }

        fn lm_head_backward(
            hidden: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            targets: IntTensor<Self>,
            lse: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            chunk: usize,
            weight_grad: bool,
        ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
            // The weight's gradient sums over every row; the frozen head of LoRA training never
            // asks for it, so that case keeps the tensor-op path.
            if weight_grad || !is_f32(&[&hidden, &weight, &grad]) {
                return super::default_backward::<Self>(
                    hidden,
                    weight,
                    targets,
                    lse,
                    grad,
                    chunk,
                    weight_grad,
                );
            }
            let (hshape, dtype) = (hidden.layout().shape().clone(), hidden.dtype());
            let (n, h) = (hshape[0], hshape[1]);
            let v = weight.layout().shape()[0];
            let chunk = chunk.clamp(1, v.max(1));
            let (hs, ws, ts) = (
                f32_slice(&hidden),
                f32_slice(&weight),
                int_targets(&targets),
            );
            let (ls, gs) = (f32_slice(&lse), f32_slice(&grad));
            let round = rounding(dtype);
            let mut dh = vec![0f32; n * h];
            let out = SharedOut::new(&mut dh);
            (0..n.div_ceil(ROWS)).into_par_iter().for_each(|b| {
                let (r0, rows) = (b * ROWS, ROWS.min(n - b * ROWS));
                let mut d = vec![0f32; rows * chunk];
                let mut acc = vec![0f32; rows * h];
                for c0 in (0..v).step_by(chunk) {
                    let len = chunk.min(v - c0);
                    let dl = &mut d[..rows * len];
                    block_logits(dl, &hs[r0 * h..], &ws[c0 * h..], rows, len, h);
                    // dlogits = g · (onehot(target) − softmax), from logits in the input type.
                    for (i, row) in dl.chunks_mut(len).enumerate() {
                        let (l, g) = (ls[r0 + i], gs[r0 + i]);
                        row.iter_mut().for_each(|x| *x = -g * (round(*x) - l).exp());
                        let t = ts[r0 + i];
                        if t >= c0 as i64 && t < (c0 + len) as i64 {
                            row[t as usize - c0] += g;
                        }
                    }
                    // dh_blk += dlogits · W_c
                    matmul(
                        rows,
                        h,
                        len,
                        acc.as_mut_slice(),
                        h,
                        true,
                        dl,
                        len,
                        1,
                        &ws[c0 * h..],
                        h,
                        1,
                        1.0,
                    );
                }
                // SAFETY: rows r0.. belong to this task alone.
                unsafe { out.write_slice(r0 * h, &acc) };
            });
            (store(dh, hshape, dtype), None)
        }
    }
}
