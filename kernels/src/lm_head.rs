//! Fused LM head (as in Cut Cross-Entropy): from final hidden states `[N, H]` and the output weight
//! `[V, H]`, each row's target log-prob, log-sum-exp and mean logit, without the `[N, V]` logits.
//!
//! The vocabulary is processed in chunks of `chunk` rows of the weight: each chunk's logits
//! `[N, chunk]` go through the selective log-softmax (a kernel on wgpu/CUDA) and the running
//! log-sum-exp is merged across chunks. The backward pass recomputes each chunk's logits instead of
//! storing them, so the extra memory is O(N · chunk) in both directions, not O(N · V). For a frozen
//! head (LoRA training), a backend may instead compute each row's gradient `d logp / d hidden`
//! (`[N, H]`, the size of the hidden states) during the forward pass, as the CPU path does: one pass
//! over the vocabulary per step instead of two.

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

/// (`logp`, `lse`, `mean_logit`, `d logp / d hidden`): the forward's outputs and each row's
/// gradient.
pub type HeadWithRowGrads<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
);

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

    /// The forward pass for a weight that does not train, also returning each row's gradient
    /// `d logp / d hidden` (`[N, H]`, f32): the backward is then a product with the incoming
    /// gradient instead of a second pass over the vocabulary. `None` where the backend has no such
    /// path (the default); the backward then recomputes the logits.
    fn lm_head_forward_with_row_grads(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        chunk: usize,
    ) -> Option<HeadWithRowGrads<Self>> {
        let _ = (hidden, weight, targets, chunk);
        None
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

/// The backward of a frozen head whose forward kept each row's gradient: `d hidden = g · d logp /
/// d hidden`, row by row.
#[derive(Debug)]
struct LmHeadRowGradsBackward;

impl<B: FusedLmHeadBackend> Backward<B, 1> for LmHeadRowGradsBackward {
    /// `d logp / d hidden` `[N, H]` in f32, and the hidden states' type.
    type State = (FloatTensor<B>, DType);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [hidden_parent] = ops.parents;
        let g: Tensor<B, 1> = float(grads.consume::<B>(&ops.node));
        let (row_grads, dtype) = ops.state;
        if let Some(p) = hidden_parent {
            let rows: Tensor<B, 2> = float(row_grads);
            let n = g.dims()[0];
            let dh = rows * g.cast(DType::F32).reshape([n, 1]);
            grads.register::<B>(p.id, prim(dh.cast(dtype)));
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
        // A frozen head (LoRA training) whose hidden states need a gradient: where the backend can,
        // the forward computes each row's gradient as it goes, and the backward only scales it.
        if weight.node.requirement.is_none() && !hidden.node.requirement.is_none() {
            let dtype = burn::tensor::TensorMetadata::dtype(&hidden.primitive);
            if let Some((logp, lse, mean, row_grads)) = B::lm_head_forward_with_row_grads(
                hidden.primitive.clone(),
                weight.primitive.clone(),
                targets.clone(),
                chunk,
            ) {
                let logp = match LmHeadRowGradsBackward
                    .prepare::<C>([hidden.node.clone()])
                    .compute_bound()
                    .stateful()
                {
                    OpsKind::Tracked(prep) => prep.finish((row_grads, dtype), logp),
                    OpsKind::UnTracked(prep) => prep.finish(logp),
                };
                return (logp, lift(lse), lift(mean));
            }
        }
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
    use burn::tensor::{
        DType,
        ops::{FloatTensor, IntTensor},
    };
    use burn_flex::Flex;
    use rayon::prelude::*;

    use super::FusedLmHeadBackend;

    use crate::cpu::{
        SharedOut, f32_slice, f32_tensor, is_f32, matmul_to_columns, rounding, store,
    };
    use crate::vector_exp::exp_in_place;

    /// Rows per parallel task: a task's logits `[ROWS, chunk]` stay in cache.
    const ROWS: usize = 32;

    fn int_targets(t: &IntTensor<Flex>) -> Vec<i64> {
        t.to_contiguous()
            .into_data()
            .convert::<i64>()
            .into_vec::<i64>()
            .unwrap_or_default()
    }

    /// The head's operands as f32 and its shapes.
    struct Head<'a> {
        hs: &'a [f32],
        ws: &'a [f32],
        ts: &'a [i64],
        h: usize,
        v: usize,
        chunk: usize,
        dtype: DType,
    }

    /// Where the tasks write: per row `logp`, `lse` and mean logit, and optionally `d logp / d h`
    /// (`[N, H]`, row-major).
    struct Outputs {
        logp: SharedOut,
        lse: SharedOut,
        mean: SharedOut,
        row_grads: Option<SharedOut>,
    }

    /// Rows `r0 .. r0 + rows` through every vocabulary chunk: the chunk's logits by gemm (column
    /// major, `[len, rows]`, which gemm writes fastest), then an online log-sum-exp, the target's
    /// logit and the running logit sum, so neither `[N, V]` nor `[N, chunk]` is ever allocated.
    /// With `row_grads`, the softmax-weighted sum of the weight rows is accumulated along the way
    /// (rescaled as the running maximum moves), giving `d logp / d h = W[target] − Σ p · W`
    /// without a second pass over the vocabulary. f32 arithmetic whatever the input type.
    fn head_block(p: &Head<'_>, r0: usize, rows: usize, out: &Outputs) {
        let (h, round) = (p.h, rounding(p.dtype));
        let hs = &p.hs[r0 * h..];
        let mut logits = vec![0f32; rows * p.chunk];
        let (mut m, mut s) = (vec![f32::NEG_INFINITY; rows], vec![0f32; rows]);
        let (mut target, mut sum) = (vec![0f32; rows], vec![0f64; rows]);
        let mut chunk_max = vec![f32::NEG_INFINITY; rows];
        // Σ exp(logit − m) · W row, column-major `[H, rows]`.
        let mut weighted = out.row_grads.as_ref().map(|_| vec![0f32; rows * h]);
        for c0 in (0..p.v).step_by(p.chunk) {
            let len = p.chunk.min(p.v - c0);
            let (x, wc) = (&mut logits[..rows * len], &p.ws[c0 * h..]);
            matmul_to_columns(rows, len, h, x, false, (hs, h, 1), (wc, 1, h), 1.0);
            // Logits in the input type, as the matmul of the tensor-op path gives them.
            if p.dtype != DType::F32 {
                x.iter_mut().for_each(|e| *e = round(*e));
            }
            chunk_max.fill(f32::NEG_INFINITY);
            for col in x.chunks(rows) {
                for ((cm, total), &e) in chunk_max.iter_mut().zip(sum.iter_mut()).zip(col) {
                    *cm = cm.max(e);
                    *total += e as f64;
                }
            }
            for i in 0..rows {
                let t = p.ts[r0 + i];
                if t >= c0 as i64 && t < (c0 + len) as i64 {
                    target[i] = x[(t as usize - c0) * rows + i];
                }
                let nm = m[i].max(chunk_max[i]);
                let scale = (m[i] - nm).exp();
                s[i] *= scale;
                if let Some(wd) = &mut weighted {
                    wd[i..].iter_mut().step_by(rows).for_each(|e| *e *= scale);
                }
                m[i] = nm;
            }
            // exp(logits − m), in place.
            for col in x.chunks_mut(rows) {
                col.iter_mut().zip(&m).for_each(|(e, &mi)| *e -= mi);
            }
            exp_in_place(x);
            for col in x.chunks(rows) {
                s.iter_mut().zip(col).for_each(|(si, &e)| *si += e);
            }
            if let Some(wd) = &mut weighted {
                // weighted [rows, H] += exp(logits − m) [rows, len] · W_c [len, H]
                matmul_to_columns(rows, h, len, wd, true, (x, 1, rows), (wc, h, 1), 1.0);
            }
        }
        let mut grad_row = vec![0f32; h];
        for i in 0..rows {
            let l = m[i] + s[i].ln();
            // SAFETY: rows r0.. belong to this task alone.
            unsafe {
                out.logp.write(r0 + i, target[i] - l);
                out.lse.write(r0 + i, l);
                out.mean.write(r0 + i, (sum[i] / p.v as f64) as f32);
            }
            if let (Some(dst), Some(wd)) = (&out.row_grads, &weighted) {
                let t = p.ts[r0 + i];
                let w_t = (t >= 0 && (t as usize) < p.v).then(|| &p.ws[t as usize * h..][..h]);
                for (c, g) in grad_row.iter_mut().enumerate() {
                    *g = w_t.map_or(0.0, |w| w[c]) - wd[c * rows + i] / s[i];
                }
                // SAFETY: row r0 + i belongs to this task alone.
                unsafe { dst.write_slice((r0 + i) * h, &grad_row) };
            }
        }
    }

    /// Runs the head over all rows in parallel: (`logp`, `lse`, mean logit) and, when asked,
    /// `d logp / d h` as an f32 `[N, H]` tensor.
    #[allow(clippy::type_complexity)]
    fn run_head(
        hidden: &FloatTensor<Flex>,
        weight: &FloatTensor<Flex>,
        targets: &IntTensor<Flex>,
        chunk: usize,
        row_grads: bool,
    ) -> (
        FloatTensor<Flex>,
        FloatTensor<Flex>,
        FloatTensor<Flex>,
        Option<FloatTensor<Flex>>,
    ) {
        let (hshape, dtype) = (hidden.layout().shape().clone(), hidden.dtype());
        let (n, h) = (hshape[0], hshape[1]);
        let v = weight.layout().shape()[0];
        let (hs, ws, ts) = (f32_slice(hidden), f32_slice(weight), int_targets(targets));
        let head = Head {
            hs: &hs,
            ws: &ws,
            ts: &ts,
            h,
            v,
            chunk: chunk.clamp(1, v.max(1)),
            dtype,
        };
        let (mut logp, mut lse, mut mean) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        let mut grads = vec![0f32; if row_grads { n * h } else { 0 }];
        let out = Outputs {
            logp: SharedOut::new(&mut logp),
            lse: SharedOut::new(&mut lse),
            mean: SharedOut::new(&mut mean),
            row_grads: row_grads.then(|| SharedOut::new(&mut grads)),
        };
        (0..n.div_ceil(ROWS)).into_par_iter().for_each(|b| {
            head_block(&head, b * ROWS, ROWS.min(n - b * ROWS), &out);
        });
        (
            store(logp, [n].into(), dtype),
            f32_tensor(lse, [n].into()),
            store(mean, [n].into(), dtype),
            row_grads.then(|| f32_tensor(grads, hshape)),
        )
    }

    /// The backward keeps the tensor-op path: with a frozen head (LoRA training) the forward has
    /// already computed each row's gradient, and a head that trains needs the weight's gradient,
    /// a sum over every row.
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
            let (logp, lse, mean, _) = run_head(&hidden, &weight, &targets, chunk, false);
            (logp, lse, mean)
        }

        fn lm_head_forward_with_row_grads(
            hidden: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            targets: IntTensor<Self>,
            chunk: usize,
        ) -> Option<super::HeadWithRowGrads<Self>> {
            if !is_f32(&[&hidden, &weight]) {
                return None;
            }
            let (logp, lse, mean, grads) = run_head(&hidden, &weight, &targets, chunk, true);
            Some((logp, lse, mean, grads?))
        }
    }
}
