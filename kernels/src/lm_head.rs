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
        let h: Tensor<Self, 2> = float(hidden);
        let w: Tensor<Self, 2> = float(weight);
        let t = Tensor::<Self, 1, Int>::from_primitive(targets);
        let [n, _] = h.dims();
        let v = w.dims()[0];
        let (device, dtype) = (h.device(), h.dtype());
        let f32_zeros = || Tensor::<Self, 1>::zeros([n], (&device, DType::F32));
        let mut lse: Option<Tensor<Self, 1>> = None;
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
            let (_, lse_c) = Self::slsm_forward(prim(logits), idx.into_primitive());
            let lse_c: Tensor<Self, 1> = float(lse_c);
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
        let h: Tensor<Self, 2> = float(hidden);
        let w: Tensor<Self, 2> = float(weight);
        let t = Tensor::<Self, 1, Int>::from_primitive(targets);
        let lse: Tensor<Self, 1> = float(lse);
        let dtype = h.dtype();
        let g: Tensor<Self, 1> = float::<Self, 1>(grad).cast(dtype);
        let v = w.dims()[0];
        // Chunk contributions are summed in f32.
        let mut dh = Tensor::<Self, 2>::zeros(h.dims(), (&h.device(), DType::F32));
        let mut dw = Vec::new();
        for start in (0..v).step_by(chunk.max(1)) {
            let len = chunk.max(1).min(v - start);
            let wc = w.clone().narrow(0, start, len);
            let logits = h.clone().matmul(wc.clone().transpose());
            // Targets relative to the chunk; those in another chunk fall outside `[0, len)` and get
            // no one-hot term. (Adding g at a clamped column and taking it back would cancel
            // catastrophically in f16/bf16.)
            let local = t.clone().sub_scalar(start as i64);
            let d: Tensor<Self, 2> = float(Self::slsm_backward(
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

#[cfg(feature = "flex")]
impl FusedLmHeadBackend for burn_flex::Flex {}

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
