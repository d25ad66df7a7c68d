//! Causal self-attention over variable-length sequences packed token-major (FlashAttention's
//! "varlen" form): queries `[T, heads · d]`, keys and values `[T, kv_heads · d]` (grouped-query:
//! query head `j` reads key/value head `j / (heads / kv_heads)`), sequences delimited by a
//! [`SeqLayout`], no token attending across a boundary or ahead of itself.
//!
//! The backward pass recomputes the attention probabilities from `q`, `k` and the saved per-row
//! log-sum-exp instead of storing them, so a layer keeps `O(T · d)` for attention, not `O(T²)`.
//! Every backend gets that; the CPU backend (burn-flex) also runs both directions as one parallel
//! loop over (sequence, key/value head), in blocks of query rows that skip the masked upper triangle.

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
        Bool, DType, Tensor, TensorPrimitive,
        backend::{AutodiffBackend, Backend},
        ops::FloatTensor,
    },
};

use crate::SeqLayout;

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// Head counts and width of an attention layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (a divisor of `heads`).
    pub kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
}

impl HeadShape {
    fn rep(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }
}

/// The attention operations.
pub trait AttentionBackend: Backend {
    /// `softmax(q·kᵀ·scale + causal mask) · v` per sequence and head → (`out` `[T, heads · d]` in
    /// `q`'s type, `lse` `[T, heads]` in f32, each row's log-sum-exp). The default implementation
    /// uses tensor operations.
    fn attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        layout: &SeqLayout,
        shape: HeadShape,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        tensor_ops::forward::<Self>(q, k, v, layout, shape, scale)
    }

    /// `(dq, dk, dv)` for the upstream gradient `dout`, recomputing the probabilities from the
    /// saved `lse`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        layout: &SeqLayout,
        shape: HeadShape,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        tensor_ops::backward::<Self>(q, k, v, out, lse, dout, layout, shape, scale)
    }
}

/// Causal attention of `q` `[T, heads · d]` over `k`, `v` `[T, kv_heads · d]` within each sequence
/// of `layout`; differentiable with respect to all three.
pub fn varlen_attention<B: AttentionBackend>(
    q: Tensor<B, 2>,
    k: Tensor<B, 2>,
    v: Tensor<B, 2>,
    layout: &SeqLayout,
    shape: HeadShape,
    scale: f64,
) -> Tensor<B, 2> {
    let (out, _) = B::attention_forward(prim(q), prim(k), prim(v), layout, shape, scale);
    float(out)
}

/// The operations written with tensor operations, for any backend: all sequences at once when they
/// have one length (a padded batch), one sequence at a time otherwise.
pub(crate) mod tensor_ops {
    use super::*;

    /// `[n·len, heads·d]` → `[n, kv_heads, rep·len, d]`: the query heads that share a key/value head
    /// stacked along time, so one matmul serves the group.
    fn group<B: Backend>(q: Tensor<B, 2>, n: usize, len: usize, s: HeadShape) -> Tensor<B, 4> {
        let (kvh, rep, d) = (s.kv_heads, s.rep(), s.head_dim);
        q.reshape([n, len, kvh, rep, d])
            .permute([0, 2, 3, 1, 4])
            .reshape([n, kvh, rep * len, d])
    }

    fn ungroup<B: Backend>(o: Tensor<B, 4>, n: usize, len: usize, s: HeadShape) -> Tensor<B, 2> {
        let (kvh, rep, d) = (s.kv_heads, s.rep(), s.head_dim);
        o.reshape([n, kvh, rep, len, d])
            .permute([0, 3, 1, 2, 4])
            .reshape([n * len, kvh * rep * d])
    }

    /// `[n·len, kv_heads·d]` → `[n, kv_heads, len, d]`.
    fn kv<B: Backend>(k: Tensor<B, 2>, n: usize, len: usize, s: HeadShape) -> Tensor<B, 4> {
        k.reshape([n, len, s.kv_heads, s.head_dim]).swap_dims(1, 2)
    }

    fn unkv<B: Backend>(k: Tensor<B, 4>, n: usize, len: usize, s: HeadShape) -> Tensor<B, 2> {
        k.swap_dims(1, 2)
            .reshape([n * len, s.kv_heads * s.head_dim])
    }

    /// Scaled, causally masked scores `[n, kv_heads, rep, len, len]` in f32.
    fn scores<B: Backend>(
        qg: Tensor<B, 4>,
        kg: Tensor<B, 4>,
        n: usize,
        len: usize,
        s: HeadShape,
        scale: f64,
    ) -> Tensor<B, 5> {
        let (kvh, rep) = (s.kv_heads, s.rep());
        let sc = (qg.matmul(kg.swap_dims(2, 3)) * scale).reshape([n, kvh, rep, len, len]);
        let device = sc.device();
        let future = Tensor::<B, 2, Bool>::tril_mask([len, len], 0, &device)
            .reshape([1, 1, 1, len, len])
            .expand([n, kvh, rep, len, len]);
        sc.mask_fill(future, f32::NEG_INFINITY)
    }

    /// lse `[n·len, heads]` ↔ `[n, kv_heads, rep, len, 1]`.
    fn lse_grouped<B: Backend>(
        lse: Tensor<B, 2>,
        n: usize,
        len: usize,
        s: HeadShape,
    ) -> Tensor<B, 5> {
        lse.reshape([n, len, s.kv_heads, s.rep()])
            .permute([0, 2, 3, 1])
            .reshape([n, s.kv_heads, s.rep(), len, 1])
    }

    fn forward_group<B: Backend>(
        q: Tensor<B, 2>,
        k: Tensor<B, 2>,
        v: Tensor<B, 2>,
        n: usize,
        len: usize,
        s: HeadShape,
        scale: f64,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let dtype = q.dtype();
        let (kvh, rep) = (s.kv_heads, s.rep());
        let qg = group(q.cast(DType::F32), n, len, s);
        let kg = kv(k.cast(DType::F32), n, len, s);
        let vg = kv(v.cast(DType::F32), n, len, s);
        let sc = scores(qg, kg, n, len, s, scale);
        let m = sc.clone().max_dim(4);
        let lse = m.clone() + (sc.clone() - m).exp().sum_dim(4).log();
        let p = (sc - lse.clone()).exp().reshape([n, kvh, rep * len, len]);
        let o = ungroup(p.matmul(vg), n, len, s).cast(dtype);
        let lse = lse
            .reshape([n, kvh, rep, len])
            .permute([0, 3, 1, 2])
            .reshape([n * len, s.heads]);
        (o, lse)
    }

    #[allow(clippy::too_many_arguments)]
    fn backward_group<B: Backend>(
        q: Tensor<B, 2>,
        k: Tensor<B, 2>,
        v: Tensor<B, 2>,
        o: Tensor<B, 2>,
        lse: Tensor<B, 2>,
        dout: Tensor<B, 2>,
        n: usize,
        len: usize,
        s: HeadShape,
        scale: f64,
    ) -> (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>) {
        let dtype = q.dtype();
        let (kvh, rep) = (s.kv_heads, s.rep());
        let qg = group(q.cast(DType::F32), n, len, s);
        let kg = kv(k.cast(DType::F32), n, len, s);
        let vg = kv(v.cast(DType::F32), n, len, s);
        let og = group(o.cast(DType::F32), n, len, s);
        let dog = group(dout.cast(DType::F32), n, len, s);
        let sc = scores(qg.clone(), kg.clone(), n, len, s, scale);
        let p = (sc - lse_grouped(lse, n, len, s))
            .exp()
            .reshape([n, kvh, rep * len, len]);
        let dv = p.clone().swap_dims(2, 3).matmul(dog.clone());
        let dp = dog.clone().matmul(vg.swap_dims(2, 3));
        let rowdot = (dog * og).sum_dim(3);
        let ds = p * (dp - rowdot) * scale;
        let dq = ds.clone().matmul(kg);
        let dk = ds.swap_dims(2, 3).matmul(qg);
        (
            ungroup(dq, n, len, s).cast(dtype),
            unkv(dk, n, len, s).cast(dtype),
            unkv(dv, n, len, s).cast(dtype),
        )
    }

    pub fn forward<B: Backend>(
        q: FloatTensor<B>,
        k: FloatTensor<B>,
        v: FloatTensor<B>,
        layout: &SeqLayout,
        s: HeadShape,
        scale: f64,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let (q, k, v): (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>) = (float(q), float(k), float(v));
        if let Some(len) = layout.uniform_len().filter(|l| *l > 0) {
            let (o, lse) = forward_group(q, k, v, layout.sequences(), len, s, scale);
            return (prim(o), prim(lse));
        }
        let (mut os, mut lses) = (Vec::new(), Vec::new());
        for r in layout.ranges().filter(|r| !r.is_empty()) {
            let part = |t: &Tensor<B, 2>| t.clone().narrow(0, r.start, r.len());
            let (o, lse) = forward_group(part(&q), part(&k), part(&v), 1, r.len(), s, scale);
            os.push(o);
            lses.push(lse);
        }
        if os.is_empty() {
            let device = q.device();
            let lse = Tensor::<B, 2>::zeros([0, s.heads], (&device, DType::F32));
            return (prim(q), prim(lse));
        }
        (prim(Tensor::cat(os, 0)), prim(Tensor::cat(lses, 0)))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        q: FloatTensor<B>,
        k: FloatTensor<B>,
        v: FloatTensor<B>,
        out: FloatTensor<B>,
        lse: FloatTensor<B>,
        dout: FloatTensor<B>,
        layout: &SeqLayout,
        s: HeadShape,
        scale: f64,
    ) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
        let (q, k, v): (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>) = (float(q), float(k), float(v));
        let (o, lse, dout): (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>) =
            (float(out), float(lse), float(dout));
        if let Some(len) = layout.uniform_len().filter(|l| *l > 0) {
            let n = layout.sequences();
            let (dq, dk, dv) = backward_group(q, k, v, o, lse, dout, n, len, s, scale);
            return (prim(dq), prim(dk), prim(dv));
        }
        let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
        for r in layout.ranges().filter(|r| !r.is_empty()) {
            let part = |t: &Tensor<B, 2>| t.clone().narrow(0, r.start, r.len());
            let (dq, dk, dv) = backward_group(
                part(&q),
                part(&k),
                part(&v),
                part(&o),
                part(&lse),
                part(&dout),
                1,
                r.len(),
                s,
                scale,
            );
            dqs.push(dq);
            dks.push(dk);
            dvs.push(dv);
        }
        if dqs.is_empty() {
            return (prim(q), prim(k), prim(v));
        }
        (
            prim(Tensor::cat(dqs, 0)),
            prim(Tensor::cat(dks, 0)),
            prim(Tensor::cat(dvs, 0)),
        )
    }
}

#[cfg(feature = "ndarray")]
impl AttentionBackend for burn::backend::NdArray {}

#[derive(Debug)]
struct AttentionBackward;

/// What the backward pass needs: the inputs (by node), the output, the log-sum-exp and the options.
type AttentionState<B> = (
    [NodeId; 3],
    FloatTensor<B>,
    FloatTensor<B>,
    SeqLayout,
    HeadShape,
    f64,
);

impl<B: AttentionBackend> Backward<B, 3> for AttentionBackward {
    type State = AttentionState<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let dout = grads.consume::<B>(&ops.node);
        let ([q_id, k_id, v_id], out, lse, layout, shape, scale) = ops.state;
        let q: FloatTensor<B> = checkpointer.retrieve_node_output(q_id);
        let k: FloatTensor<B> = checkpointer.retrieve_node_output(k_id);
        let v: FloatTensor<B> = checkpointer.retrieve_node_output(v_id);
        let (dq, dk, dv) = B::attention_backward(q, k, v, out, lse, dout, &layout, shape, scale);
        for (parent, grad) in ops.parents.into_iter().zip([dq, dk, dv]) {
            if let Some(p) = parent {
                grads.register::<B>(p.id, grad);
            }
        }
    }
}

impl<B: AttentionBackend, C: CheckpointStrategy> AttentionBackend for Autodiff<B, C> {
    fn attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        layout: &SeqLayout,
        shape: HeadShape,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let lift = <Self as AutodiffBackend>::from_inner;
        match AttentionBackward
            .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let ids = [
                    prep.checkpoint(&q),
                    prep.checkpoint(&k),
                    prep.checkpoint(&v),
                ];
                let (out, lse) = B::attention_forward(
                    q.primitive,
                    k.primitive,
                    v.primitive,
                    layout,
                    shape,
                    scale,
                );
                let state = (ids, out.clone(), lse.clone(), layout.clone(), shape, scale);
                (prep.finish(state, out), lift(lse))
            }
            OpsKind::UnTracked(prep) => {
                let (out, lse) = B::attention_forward(
                    q.primitive,
                    k.primitive,
                    v.primitive,
                    layout,
                    shape,
                    scale,
                );
                (prep.finish(out), lift(lse))
            }
        }
    }

    fn attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        layout: &SeqLayout,
        shape: HeadShape,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let lift = <Self as AutodiffBackend>::from_inner;
        let (dq, dk, dv) = B::attention_backward(
            q.primitive,
            k.primitive,
            v.primitive,
            out.primitive,
            lse.primitive,
            dout.primitive,
            layout,
            shape,
            scale,
        );
        (lift(dq), lift(dk), lift(dv))
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::tensor::ops::FloatTensor;
    use burn_flex::Flex;
    use rayon::prelude::*;

    use super::{AttentionBackend, HeadShape, tensor_ops};
    use crate::{
        SeqLayout,
        cpu::{SharedOut, f32_slice, f32_tensor, is_f32, matmul, store},
        vector_exp::exp_in_place,
    };

    /// Query rows per block: the block's scores `[BLOCK, keys]` stay in cache, and keys after the
    /// block's last row are never computed.
    const BLOCK: usize = 64;

    /// Row strides and head offsets of the token-major operands.
    #[derive(Clone, Copy)]
    struct Strides {
        q: usize,
        kv: usize,
        d: usize,
    }

    impl Strides {
        fn of(s: HeadShape) -> Self {
            Self {
                q: s.heads * s.head_dim,
                kv: s.kv_heads * s.head_dim,
                d: s.head_dim,
            }
        }
    }

    /// Every (sequence, key/value head) pair: the unit of parallel work.
    fn tasks(layout: &SeqLayout, s: HeadShape) -> Vec<(std::ops::Range<usize>, usize)> {
        layout
            .ranges()
            .filter(|r| !r.is_empty())
            .flat_map(|r| (0..s.kv_heads).map(move |g| (r.clone(), g)))
            .collect()
    }

    /// Scaled scores of query rows `q0..q0+bq` of head `j` against keys `0..nk` of head `g` (all in
    /// the sequence starting at token `s0`), into `sc` `[bq, nk]`.
    #[allow(clippy::too_many_arguments)]
    fn block_scores(
        sc: &mut [f32],
        q: &[f32],
        k: &[f32],
        st: Strides,
        s0: usize,
        q0: usize,
        bq: usize,
        nk: usize,
        j: usize,
        g: usize,
        scale: f32,
    ) {
        let qp = &q[(s0 + q0) * st.q + j * st.d..];
        let kp = &k[s0 * st.kv + g * st.d..];
        // S = Q_blk · Kᵀ: Kᵀ[i, c] = K[c, i].
        matmul(
            bq, nk, st.d, sc, nk, false, qp, st.q, 1, kp, 1, st.kv, scale,
        );
    }

    /// Forward: per task, per query head of the group, per block of query rows: scores, a causal
    /// softmax in place (saving each row's log-sum-exp), then `P · V` into the output rows.
    fn forward(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        layout: &SeqLayout,
        s: HeadShape,
        scale: f32,
    ) -> (Vec<f32>, Vec<f32>) {
        let st = Strides::of(s);
        let t = layout.tokens();
        let mut out = vec![0f32; t * st.q];
        let mut lse = vec![0f32; t * s.heads];
        let (out_w, lse_w) = (SharedOut::new(&mut out), SharedOut::new(&mut lse));
        let rep = s.heads / s.kv_heads;
        tasks(layout, s).into_par_iter().for_each(|(r, g)| {
            let (s0, len) = (r.start, r.len());
            let mut sc = vec![0f32; BLOCK * len];
            for j in g * rep..(g + 1) * rep {
                for q0 in (0..len).step_by(BLOCK) {
                    let bq = BLOCK.min(len - q0);
                    let nk = q0 + bq;
                    let sc = &mut sc[..bq * nk];
                    block_scores(&mut *sc, q, k, st, s0, q0, bq, nk, j, g, scale);
                    for (i, row) in sc.chunks_mut(nk).enumerate() {
                        let (visible, future) = row.split_at_mut(q0 + i + 1);
                        let m = visible.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        visible.iter_mut().for_each(|x| *x -= m);
                        exp_in_place(visible);
                        let sum = visible.iter().fold(0f32, |acc, x| acc + x);
                        let inv = 1.0 / sum;
                        visible.iter_mut().for_each(|x| *x *= inv);
                        future.fill(0.0);
                        // SAFETY: each (token, head) is written by exactly one task.
                        unsafe { lse_w.write((s0 + q0 + i) * s.heads + j, m + sum.ln()) };
                    }
                    let vp = &v[s0 * st.kv + g * st.d..];
                    // Rows s0+q0.. of head j belong to this task alone.
                    let dst = out_w.at((s0 + q0) * st.q + j * st.d);
                    matmul(bq, st.d, nk, dst, st.q, false, sc, nk, 1, vp, st.kv, 1, 1.0);
                }
            }
        });
        (out, lse)
    }

    /// Backward: per task, per query head, per block: recompute `P` from the scores and the saved
    /// log-sum-exp, then `dV += Pᵀ·dO`, `dS = P ∘ (dO·Vᵀ − rowsum(dO ∘ O))`, `dQ = dS·K·scale`,
    /// `dK += dSᵀ·Q·scale`; the key/value gradients of a task are summed locally and written once.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        o: &[f32],
        lse: &[f32],
        dout: &[f32],
        layout: &SeqLayout,
        s: HeadShape,
        scale: f32,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let st = Strides::of(s);
        let t = layout.tokens();
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; t * st.q],
            vec![0f32; t * st.kv],
            vec![0f32; t * st.kv],
        );
        let (dq_w, dk_w, dv_w) = (
            SharedOut::new(&mut dq),
            SharedOut::new(&mut dk),
            SharedOut::new(&mut dv),
        );
        let rep = s.heads / s.kv_heads;
        let d = st.d;
        tasks(layout, s).into_par_iter().for_each(|(r, g)| {
            let (s0, len) = (r.start, r.len());
            let mut p = vec![0f32; BLOCK * len];
            let mut ds = vec![0f32; BLOCK * len];
            let mut dk_loc = vec![0f32; len * d];
            let mut dv_loc = vec![0f32; len * d];
            let kp = &k[s0 * st.kv + g * d..];
            let vp = &v[s0 * st.kv + g * d..];
            for j in g * rep..(g + 1) * rep {
                for q0 in (0..len).step_by(BLOCK) {
                    let bq = BLOCK.min(len - q0);
                    let nk = q0 + bq;
                    let (p, ds) = (&mut p[..bq * nk], &mut ds[..bq * nk]);
                    block_scores(&mut *p, q, k, st, s0, q0, bq, nk, j, g, scale);
                    for (i, row) in p.chunks_mut(nk).enumerate() {
                        let l = lse[(s0 + q0 + i) * s.heads + j];
                        let (visible, future) = row.split_at_mut(q0 + i + 1);
                        visible.iter_mut().for_each(|x| *x -= l);
                        exp_in_place(visible);
                        future.fill(0.0);
                    }
                    let row0 = (s0 + q0) * st.q + j * d;
                    let (dop, qp) = (&dout[row0..], &q[row0..]);
                    // dV[0..nk] += Pᵀ · dO_blk
                    matmul(
                        nk,
                        d,
                        bq,
                        dv_loc.as_mut_slice(),
                        d,
                        true,
                        p,
                        1,
                        nk,
                        dop,
                        st.q,
                        1,
                        1.0,
                    );
                    // dP = dO_blk · Vᵀ
                    matmul(
                        bq, nk, d, &mut *ds, nk, false, dop, st.q, 1, vp, 1, st.kv, 1.0,
                    );
                    for (i, (dsr, pr)) in ds.chunks_mut(nk).zip(p.chunks(nk)).enumerate() {
                        let at = row0 + i * st.q;
                        let rowdot: f32 = dout[at..at + d]
                            .iter()
                            .zip(&o[at..at + d])
                            .map(|(a, b)| a * b)
                            .sum();
                        for (x, pv) in dsr.iter_mut().zip(pr) {
                            *x = pv * (*x - rowdot) * scale;
                        }
                    }
                    // Rows s0+q0.. of head j belong to this task alone.
                    matmul(
                        bq,
                        d,
                        nk,
                        dq_w.at(row0),
                        st.q,
                        false,
                        ds,
                        nk,
                        1,
                        kp,
                        st.kv,
                        1,
                        1.0,
                    );
                    // dK[0..nk] += dSᵀ · Q_blk
                    matmul(
                        nk,
                        d,
                        bq,
                        dk_loc.as_mut_slice(),
                        d,
                        true,
                        ds,
                        1,
                        nk,
                        qp,
                        st.q,
                        1,
                        1.0,
                    );
                }
            }
            for tok in 0..len {
                let at = (s0 + tok) * st.kv + g * d;
                // SAFETY: the (sequence, kv head) rows belong to this task alone.
                unsafe {
                    dk_w.write_slice(at, &dk_loc[tok * d..(tok + 1) * d]);
                    dv_w.write_slice(at, &dv_loc[tok * d..(tok + 1) * d]);
                }
            }
        });
        (dq, dk, dv)
    }

    /// Parallel loops over (sequence, key/value head), f32 only (other types take the tensor-op
    /// path).
    impl AttentionBackend for Flex {
        fn attention_forward(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
            layout: &SeqLayout,
            shape: HeadShape,
            scale: f64,
        ) -> (FloatTensor<Self>, FloatTensor<Self>) {
            if !is_f32(&[&q, &k, &v]) {
                return tensor_ops::forward::<Self>(q, k, v, layout, shape, scale);
            }
            let (qshape, dtype) = (q.layout().shape().clone(), q.dtype());
            let (qs, ks, vs) = (f32_slice(&q), f32_slice(&k), f32_slice(&v));
            let (out, lse) = forward(&qs, &ks, &vs, layout, shape, scale as f32);
            let t = layout.tokens();
            (
                store(out, qshape, dtype),
                f32_tensor(lse, [t, shape.heads].into()),
            )
        }

        fn attention_backward(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
            out: FloatTensor<Self>,
            lse: FloatTensor<Self>,
            dout: FloatTensor<Self>,
            layout: &SeqLayout,
            shape: HeadShape,
            scale: f64,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            if !is_f32(&[&q, &k, &v, &out, &lse, &dout]) {
                return tensor_ops::backward::<Self>(q, k, v, out, lse, dout, layout, shape, scale);
            }
            let (qshape, kshape) = (q.layout().shape().clone(), k.layout().shape().clone());
            let (qtype, ktype) = (q.dtype(), k.dtype());
            let (dq, dk, dv) = backward(
                &f32_slice(&q),
                &f32_slice(&k),
                &f32_slice(&v),
                &f32_slice(&out),
                &f32_slice(&lse),
                &f32_slice(&dout),
                layout,
                shape,
                scale as f32,
            );
            (
                store(dq, qshape, qtype),
                store(dk, kshape.clone(), ktype),
                store(dv, kshape, ktype),
            )
        }
    }
}

#[cfg(feature = "cube")]
mod cube {
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
    use burn_fusion::{Fusion, FusionBackend};

    use super::AttentionBackend;

    // The tensor-op default methods serve the GPU backends.
    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> AttentionBackend
        for CubeBackend<R, F, I, BT>
    {
    }

    impl<B: FusionBackend> AttentionBackend for Fusion<B> {}
}
