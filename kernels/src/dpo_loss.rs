//! The DPO sigmoid loss with label smoothing (conservative DPO) as one kernel per direction: from
//! per-token policy log-probs `[2P, T]` in `[chosen.., rejected..]` row order, the completion mask
//! and the reference's per-row sums `[2P]`, each pair's loss, its chosen and rejected rewards, and
//! the gradient with respect to the policy token log-probs.
//!
//! With `h = (Σ pol·mask − ref)_chosen − (Σ pol·mask − ref)_rejected` and `z = β·h`:
//! `loss = −(1−ε)·log σ(z) − ε·log σ(−z)`, `∂loss/∂h = −β·((1−ε)·σ(−z) − ε·σ(z))`, and the gradient
//! of a token log-prob is that coefficient times its mask, negated on rejected rows.

use burn::{
    backend::{
        Autodiff,
        autodiff::{
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

/// Per-pair results of the forward pass, `[P]` each.
pub type DpoForward<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
);

/// The DPO loss operations.
pub trait DpoLossBackend: Backend {
    /// `policy` `[2P, T]`, `mask` `[2P, T]`, `reference` sums `[2P]` → (`loss`, `chosen_reward`,
    /// `rejected_reward`, `∂loss/∂h`), `[P]` each. The default uses tensor operations.
    fn dpo_sigmoid_forward(
        policy: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        reference: FloatTensor<Self>,
        beta: f32,
        label_smoothing: f32,
    ) -> DpoForward<Self> {
        // Sums over the completion in f32 whatever the input type; results in the policy's type.
        let pol: Tensor<Self, 2> = float(policy);
        let dtype = pol.dtype();
        let pol = pol.cast(DType::F32);
        let mask = float::<Self, 2>(mask).cast(DType::F32);
        let reference = float::<Self, 1>(reference).cast(DType::F32);
        let rows = pol.dims()[0];
        let p = rows / 2;
        let ratio = (pol * mask).sum_dim(1).reshape([rows]) - reference;
        let (c, r) = (ratio.clone().narrow(0, 0, p), ratio.narrow(0, p, p));
        let (beta, eps) = (beta as f64, label_smoothing as f64);
        let z = (c.clone() - r.clone()) * beta;
        // −log σ(z) = softplus(−z), −log σ(−z) = softplus(z), with
        // softplus(x) = max(x, 0) + ln(1 + e^(−|x|)), which cannot overflow.
        let tail = (z.clone().abs().neg().exp() + 1.0).log();
        let sp_neg = z.clone().neg().clamp_min(0.0) + tail.clone();
        let sp_pos = z.clamp_min(0.0) + tail;
        let loss = sp_neg.clone() * (1.0 - eps) + sp_pos.clone() * eps;
        let (sig, sig_neg) = (sp_neg.neg().exp(), sp_pos.neg().exp());
        let coef = (sig_neg * (1.0 - eps) - sig * eps) * (-beta);
        let out = |t: Tensor<Self, 1>| prim(t.cast(dtype));
        (out(loss), out(c * beta), out(r * beta), out(coef))
    }

    /// `∂(Σ grad·loss)/∂policy` `[2P, T]`: `grad·coef·mask`, negated on rejected rows.
    fn dpo_sigmoid_backward(
        mask: FloatTensor<Self>,
        coef: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let mask: Tensor<Self, 2> = float(mask);
        let k: Tensor<Self, 1> = float::<Self, 1>(coef) * float::<Self, 1>(grad);
        let p = k.dims()[0];
        let per_row = Tensor::cat(vec![k.clone(), k.neg()], 0).reshape([2 * p, 1]);
        prim(mask * per_row)
    }
}

/// Per-pair outputs of [`dpo_sigmoid_loss`].
#[derive(Debug, Clone)]
pub struct DpoLossOutput<B: Backend> {
    /// Each pair's loss, differentiable with respect to the policy token log-probs.
    pub loss: Tensor<B, 1>,
    /// `β·(policy − reference)` of the chosen completion (not differentiable).
    pub chosen_rewards: Tensor<B, 1>,
    /// The same for the rejected completion.
    pub rejected_rewards: Tensor<B, 1>,
}

/// The sigmoid DPO loss (conservative with `label_smoothing` > 0) per pair, from per-token policy
/// log-probs `[2P, T]`, the completion mask `[2P, T]` and the reference's per-row sums `[2P]`.
pub fn dpo_sigmoid_loss<B: DpoLossBackend>(
    policy: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    reference: Tensor<B, 1>,
    beta: f64,
    label_smoothing: f64,
) -> DpoLossOutput<B> {
    // One float type for the kernel: the policy's.
    let dtype = policy.dtype();
    let (loss, chosen, rejected, _) = B::dpo_sigmoid_forward(
        prim(policy),
        prim(mask.cast(dtype)),
        prim(reference.cast(dtype)),
        beta as f32,
        label_smoothing as f32,
    );
    DpoLossOutput {
        loss: float(loss),
        chosen_rewards: float(chosen),
        rejected_rewards: float(rejected),
    }
}

#[cfg(feature = "ndarray")]
impl DpoLossBackend for burn::backend::NdArray {}

#[cfg(feature = "flex")]
impl DpoLossBackend for burn_flex::Flex {}

#[derive(Debug)]
struct DpoBackward;

impl<B: DpoLossBackend> Backward<B, 1> for DpoBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let g = grads.consume::<B>(&ops.node);
        let (mask, coef) = ops.state;
        if let Some(p) = parent {
            grads.register::<B>(p.id, B::dpo_sigmoid_backward(mask, coef, g));
        }
    }
}

impl<B: DpoLossBackend, C: CheckpointStrategy> DpoLossBackend for Autodiff<B, C> {
    fn dpo_sigmoid_forward(
        policy: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        reference: FloatTensor<Self>,
        beta: f32,
        label_smoothing: f32,
    ) -> DpoForward<Self> {
        let lift = <Self as AutodiffBackend>::from_inner;
        let (m, r) = (mask.primitive, reference.primitive);
        match DpoBackward
            .prepare::<C>([policy.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (loss, c, rj, coef) =
                    B::dpo_sigmoid_forward(policy.primitive, m.clone(), r, beta, label_smoothing);
                let out = prep.finish((m, coef.clone()), loss);
                (out, lift(c), lift(rj), lift(coef))
            }
            OpsKind::UnTracked(prep) => {
                let (loss, c, rj, coef) =
                    B::dpo_sigmoid_forward(policy.primitive, m, r, beta, label_smoothing);
                (prep.finish(loss), lift(c), lift(rj), lift(coef))
            }
        }
    }

    fn dpo_sigmoid_backward(
        mask: FloatTensor<Self>,
        coef: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let out = B::dpo_sigmoid_backward(mask.primitive, coef.primitive, grad.primitive);
        <Self as AutodiffBackend>::from_inner(out)
    }
}

#[cfg(feature = "cube")]
mod cube {
    use burn::tensor::{Shape, ops::FloatTensor};
    use burn_cubecl::{
        BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement,
        ops::numeric::empty_device_dtype,
    };
    use burn_fusion::{Fusion, FusionBackend};
    use cubecl::prelude::*;

    use super::{DpoForward, DpoLossBackend};
    use crate::{cube_grid::grid, fusion_op::custom_op};

    /// One cube per pair: each unit sums `(policy · mask)` over strided tokens of the chosen and the
    /// rejected row in f32, a shared-memory tree merges them, and unit 0 writes the pair's numbers.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    fn dpo_fwd_kernel<F: Float>(
        policy: &Tensor<F>,
        mask: &Tensor<F>,
        reference: &Tensor<F>,
        loss: &mut Tensor<F>,
        chosen: &mut Tensor<F>,
        rejected: &mut Tensor<F>,
        coef: &mut Tensor<F>,
        beta: f32,
        eps: f32,
        #[comptime] block: usize,
        #[define(F)] _dtype: StorageType,
    ) {
        let pair = CUBE_POS;
        let pairs = loss.shape(0);
        if pair >= pairs {
            terminate!();
        }
        let tid = UNIT_POS as usize;
        let len = policy.shape(1);
        let rc = pair;
        let rr = pair + pairs;
        let mut ac = f32::new(0.0);
        let mut ar = f32::new(0.0);
        let mut t = tid;
        while t < len {
            let pc = rc * policy.stride(0) + t * policy.stride(1);
            let mc = rc * mask.stride(0) + t * mask.stride(1);
            let pr = rr * policy.stride(0) + t * policy.stride(1);
            let mr = rr * mask.stride(0) + t * mask.stride(1);
            ac += f32::cast_from(policy[pc]) * f32::cast_from(mask[mc]);
            ar += f32::cast_from(policy[pr]) * f32::cast_from(mask[mr]);
            t += block;
        }
        let mut sc = SharedMemory::<f32>::new(block);
        let mut sr = SharedMemory::<f32>::new(block);
        sc[tid] = ac;
        sr[tid] = ar;
        sync_cube();
        let mut half = (block / 2).runtime();
        while half > 0 {
            if tid < half {
                sc[tid] += sc[tid + half];
                sr[tid] += sr[tid + half];
            }
            sync_cube();
            half /= 2;
        }
        if tid == 0 {
            let c = sc[0] - f32::cast_from(reference[rc * reference.stride(0)]);
            let r = sr[0] - f32::cast_from(reference[rr * reference.stride(0)]);
            let z = beta * (c - r);
            // softplus(±z) = max(±z, 0) + ln(1 + e^(−|z|))
            let tail = (f32::new(1.0) + (f32::new(0.0) - z.abs()).exp()).ln();
            let sp_neg = (f32::new(0.0) - z).max(f32::new(0.0)) + tail;
            let sp_pos = z.max(f32::new(0.0)) + tail;
            let sig = (f32::new(0.0) - sp_neg).exp();
            let sig_neg = (f32::new(0.0) - sp_pos).exp();
            let o = pair * loss.stride(0);
            loss[o] = F::cast_from((f32::new(1.0) - eps) * sp_neg + eps * sp_pos);
            chosen[pair * chosen.stride(0)] = F::cast_from(beta * c);
            rejected[pair * rejected.stride(0)] = F::cast_from(beta * r);
            coef[pair * coef.stride(0)] =
                F::cast_from(f32::new(0.0) - beta * ((f32::new(1.0) - eps) * sig_neg - eps * sig));
        }
    }

    /// One unit per token: `grad·coef·mask`, negated on rejected rows.
    #[cube(launch)]
    fn dpo_bwd_kernel<F: Float>(
        mask: &Tensor<F>,
        coef: &Tensor<F>,
        grad: &Tensor<F>,
        out: &mut Tensor<F>,
        #[comptime] block: usize,
        #[define(F)] _dtype: StorageType,
    ) {
        let len = mask.shape(1);
        let rows = mask.shape(0);
        let i = CUBE_POS * block + UNIT_POS as usize;
        if i >= rows * len {
            terminate!();
        }
        let row = i / len;
        let t = i % len;
        let pairs = rows / 2;
        let pair = row % pairs;
        let k = f32::cast_from(coef[pair * coef.stride(0)])
            * f32::cast_from(grad[pair * grad.stride(0)]);
        let signed = if row < pairs { k } else { f32::new(0.0) - k };
        let m = f32::cast_from(mask[row * mask.stride(0) + t * mask.stride(1)]);
        out[row * out.stride(0) + t * out.stride(1)] = F::cast_from(signed * m);
    }

    const BLOCK: usize = 128;

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> DpoLossBackend
        for CubeBackend<R, F, I, BT>
    {
        fn dpo_sigmoid_forward(
            policy: FloatTensor<Self>,
            mask: FloatTensor<Self>,
            reference: FloatTensor<Self>,
            beta: f32,
            label_smoothing: f32,
        ) -> DpoForward<Self> {
            let rows = policy.meta.shape()[0];
            let p = rows / 2;
            let (client, dtype) = (policy.client.clone(), policy.dtype);
            let new = || {
                empty_device_dtype(
                    client.clone(),
                    policy.device.clone(),
                    Shape::new([p]),
                    dtype,
                )
            };
            let (loss, c, r, coef) = (new(), new(), new(), new());
            dpo_fwd_kernel::launch(
                &client,
                grid(p),
                CubeDim::new_1d(BLOCK as u32),
                policy.into_tensor_arg(),
                mask.into_tensor_arg(),
                reference.into_tensor_arg(),
                loss.clone().into_tensor_arg(),
                c.clone().into_tensor_arg(),
                r.clone().into_tensor_arg(),
                coef.clone().into_tensor_arg(),
                beta,
                label_smoothing,
                BLOCK,
                dtype.into(),
            );
            (loss, c, r, coef)
        }

        fn dpo_sigmoid_backward(
            mask: FloatTensor<Self>,
            coef: FloatTensor<Self>,
            grad: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            let shape = mask.meta.shape().clone();
            let n = shape[0] * shape[1];
            let (client, dtype) = (mask.client.clone(), mask.dtype);
            let out = empty_device_dtype(client.clone(), mask.device.clone(), shape, dtype);
            dpo_bwd_kernel::launch(
                &client,
                grid(n.div_ceil(BLOCK)),
                CubeDim::new_1d(BLOCK as u32),
                mask.into_tensor_arg(),
                coef.into_tensor_arg(),
                grad.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                BLOCK,
                dtype.into(),
            );
            out
        }
    }

    impl<B: FusionBackend + DpoLossBackend> DpoLossBackend for Fusion<B> {
        fn dpo_sigmoid_forward(
            policy: FloatTensor<Self>,
            mask: FloatTensor<Self>,
            reference: FloatTensor<Self>,
            beta: f32,
            label_smoothing: f32,
        ) -> DpoForward<Self> {
            let pair = (Shape::new([policy.shape[0] / 2]), policy.dtype);
            let outputs = [pair.clone(), pair.clone(), pair.clone(), pair];
            let inputs = [&policy, &mask, &reference];
            let [loss, c, r, coef] =
                custom_op::<B, 4>("dpo_sigmoid_forward", &inputs, outputs, move |desc, h| {
                    let ([p, m, r], [loss, c, rj, coef]) = desc.as_fixed();
                    let out = B::dpo_sigmoid_forward(
                        h.get_float_tensor::<B>(p),
                        h.get_float_tensor::<B>(m),
                        h.get_float_tensor::<B>(r),
                        beta,
                        label_smoothing,
                    );
                    h.register_float_tensor::<B>(&loss.id, out.0);
                    h.register_float_tensor::<B>(&c.id, out.1);
                    h.register_float_tensor::<B>(&rj.id, out.2);
                    h.register_float_tensor::<B>(&coef.id, out.3);
                });
            (loss, c, r, coef)
        }

        fn dpo_sigmoid_backward(
            mask: FloatTensor<Self>,
            coef: FloatTensor<Self>,
            grad: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            let outputs = [(mask.shape.clone(), mask.dtype)];
            let inputs = [&mask, &coef, &grad];
            let [out] = custom_op::<B, 1>("dpo_sigmoid_backward", &inputs, outputs, |desc, h| {
                let ([m, coef, g], [out]) = desc.as_fixed();
                let o = B::dpo_sigmoid_backward(
                    h.get_float_tensor::<B>(m),
                    h.get_float_tensor::<B>(coef),
                    h.get_float_tensor::<B>(g),
                );
                h.register_float_tensor::<B>(&out.id, o);
            });
            out
        }
    }
}
