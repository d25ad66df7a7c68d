//! Selective log-softmax: for logits `[N, V]` and targets `[N]`, the log-probability of each row's
//! target and the row's log-sum-exp, without materialising the `[N, V]` log-softmax. The backward
//! pass, `g · (onehot(target) − exp(x − lse))`, is computed in one sweep from the logits and the saved
//! log-sum-exp; the softmax is never stored.

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
        Int, Tensor, TensorPrimitive,
        backend::{AutodiffBackend, Backend},
        ops::{FloatTensor, IntTensor},
    },
};

/// The selective log-softmax operations.
pub trait SelectiveLogSoftmaxBackend: Backend {
    /// `logits` `[N, V]`, `targets` `[N]` → (`logp` `[N]`, `lse` `[N]`). The default implementation
    /// uses tensor operations (it materialises one `[N, V]` temporary).
    fn slsm_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let x = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(logits));
        let t = Tensor::<Self, 1, Int>::from_primitive(targets);
        let max = x.clone().max_dim(1);
        let lse = (x.clone() - max.clone()).exp().sum_dim(1).log() + max;
        let n = t.dims()[0];
        let picked = x.gather(1, t.reshape([n, 1]));
        let logp = (picked - lse.clone()).reshape([n]);
        (
            logp.into_primitive().tensor(),
            lse.reshape([n]).into_primitive().tensor(),
        )
    }

    /// `dlogits[r, c] = grad[r] · (1{c = t[r]} − exp(x[r, c] − lse[r]))`, `[N, V]`.
    fn slsm_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let x = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(logits));
        let n = x.dims()[0];
        let t = Tensor::<Self, 1, Int>::from_primitive(targets).reshape([n, 1]);
        let lse = Tensor::<Self, 1>::from_primitive(TensorPrimitive::Float(lse)).reshape([n, 1]);
        let g = Tensor::<Self, 1>::from_primitive(TensorPrimitive::Float(grad)).reshape([n, 1]);
        // −g·softmax everywhere, then +g at each row's target: no one-hot `[N, V]` is built.
        ((x - lse).exp() * g.clone().neg())
            .scatter(1, t, g, burn::tensor::IndexingUpdateOp::Add)
            .into_primitive()
            .tensor()
    }
}

/// Log-probability of each row's target under a softmax over the row: `[N, V]`, `[N]` → `[N]`.
/// Differentiable with respect to the logits.
pub fn selective_log_softmax<B: SelectiveLogSoftmaxBackend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    let (logp, _lse) = B::slsm_forward(logits.into_primitive().tensor(), targets.into_primitive());
    Tensor::from_primitive(TensorPrimitive::Float(logp))
}

#[cfg(feature = "ndarray")]
impl SelectiveLogSoftmaxBackend for burn::backend::NdArray {}

#[derive(Debug)]
struct SlsmBackward;

impl<B: SelectiveLogSoftmaxBackend> Backward<B, 1> for SlsmBackward {
    type State = (NodeId, IntTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [parent] = ops.parents;
        let g = grads.consume::<B>(&ops.node);
        let (logits_id, targets, lse) = ops.state;
        let logits: FloatTensor<B> = checkpointer.retrieve_node_output(logits_id);
        if let Some(p) = parent {
            grads.register::<B>(p.id, B::slsm_backward(logits, targets, lse, g));
        }
    }
}

impl<B: SelectiveLogSoftmaxBackend, C: CheckpointStrategy> SelectiveLogSoftmaxBackend
    for Autodiff<B, C>
{
    fn slsm_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        match SlsmBackward
            .prepare::<C>([logits.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let id = prep.checkpoint(&logits);
                let (logp, lse) = B::slsm_forward(logits.primitive.clone(), targets.clone());
                let lse_out = <Self as AutodiffBackend>::from_inner(lse.clone());
                (prep.finish((id, targets, lse), logp), lse_out)
            }
            OpsKind::UnTracked(prep) => {
                let (logp, lse) = B::slsm_forward(logits.primitive, targets);
                (
                    prep.finish(logp),
                    <Self as AutodiffBackend>::from_inner(lse),
                )
            }
        }
    }

    fn slsm_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let out = B::slsm_backward(logits.primitive, targets, lse.primitive, grad.primitive);
        <Self as AutodiffBackend>::from_inner(out)
    }
}

#[cfg(feature = "cube")]
mod cube {
    use std::marker::PhantomData;

    use burn::tensor::{
        Shape,
        ops::{FloatTensor, IntTensor},
    };
    use burn_cubecl::{
        BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement, kernel::into_contiguous,
        ops::numeric::empty_device,
    };
    use burn_fusion::{
        Fusion, FusionBackend, FusionRuntime,
        stream::{Operation, OperationStreams},
    };
    use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
    use cubecl::prelude::*;

    use super::SelectiveLogSoftmaxBackend;

    /// One cube per row. Each unit keeps an online (max, sum of exponentials) pair over its strided
    /// columns in f32; pairs are merged in shared memory by a tree reduction.
    #[cube(launch)]
    fn slsm_fwd_kernel<F: Float, I: Int>(
        logits: &Tensor<F>,
        targets: &Tensor<I>,
        out: &mut Tensor<F>,
        lse: &mut Tensor<F>,
        #[comptime] block: usize,
    ) {
        let row = CUBE_POS;
        if row >= logits.shape(0) {
            terminate!();
        }
        let tid = UNIT_POS as usize;
        let v = logits.shape(1);
        let base = row * logits.stride(0);
        let cs = logits.stride(1);
        let mut m = f32::new(-3.0e38);
        let mut s = f32::new(0.0);
        let mut c = tid;
        while c < v {
            let x = f32::cast_from(logits[base + c * cs]);
            let nm = m.max(x);
            s = s * (m - nm).exp() + (x - nm).exp();
            m = nm;
            c += block;
        }
        let mut sm = SharedMemory::<f32>::new(block);
        let mut ss = SharedMemory::<f32>::new(block);
        sm[tid] = m;
        ss[tid] = s;
        sync_cube();
        let mut half = (block / 2).runtime();
        while half > 0 {
            if tid < half {
                let (m1, m2) = (sm[tid], sm[tid + half]);
                let nm = m1.max(m2);
                ss[tid] = ss[tid] * (m1 - nm).exp() + ss[tid + half] * (m2 - nm).exp();
                sm[tid] = nm;
            }
            sync_cube();
            half /= 2;
        }
        if tid == 0 {
            let l = sm[0] + ss[0].ln();
            lse[row * lse.stride(0)] = F::cast_from(l);
            let t = usize::cast_from(targets[row * targets.stride(0)]);
            out[row * out.stride(0)] = F::cast_from(f32::cast_from(logits[base + t * cs]) - l);
        }
    }

    /// One cube per row; each unit writes its strided columns of the gradient.
    #[cube(launch)]
    fn slsm_bwd_kernel<F: Float, I: Int>(
        logits: &Tensor<F>,
        targets: &Tensor<I>,
        lse: &Tensor<F>,
        grad: &Tensor<F>,
        out: &mut Tensor<F>,
        #[comptime] block: usize,
    ) {
        let row = CUBE_POS;
        if row >= logits.shape(0) {
            terminate!();
        }
        let v = logits.shape(1);
        let base = row * logits.stride(0);
        let cs = logits.stride(1);
        let l = f32::cast_from(lse[row * lse.stride(0)]);
        let g = f32::cast_from(grad[row * grad.stride(0)]);
        let t = usize::cast_from(targets[row * targets.stride(0)]);
        let obase = row * out.stride(0);
        let mut c = UNIT_POS as usize;
        while c < v {
            let p = (f32::cast_from(logits[base + c * cs]) - l).exp();
            let hit = if c == t { f32::new(1.0) } else { f32::new(0.0) };
            out[obase + c * out.stride(1)] = F::cast_from(g * (hit - p));
            c += block;
        }
    }

    fn grid(n: usize) -> CubeCount {
        // wgpu allows at most 65 535 cubes per grid dimension.
        let x = (n as u32).clamp(1, 65_535);
        CubeCount::Static(x, (n as u32).div_ceil(x), 1)
    }

    fn block_for(v: usize) -> usize {
        v.next_power_of_two().clamp(32, 256)
    }

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> SelectiveLogSoftmaxBackend
        for CubeBackend<R, F, I, BT>
    {
        fn slsm_forward(
            logits: FloatTensor<Self>,
            targets: IntTensor<Self>,
        ) -> (FloatTensor<Self>, FloatTensor<Self>) {
            let shape = logits.meta.shape().clone();
            let (n, block) = (shape[0], block_for(shape[1]));
            let client = logits.client.clone();
            let out = empty_device::<R, F>(client.clone(), logits.device.clone(), Shape::new([n]));
            let lse = empty_device::<R, F>(client.clone(), logits.device.clone(), Shape::new([n]));
            slsm_fwd_kernel::launch::<F, I, R>(
                &client,
                grid(n),
                CubeDim::new_1d(block as u32),
                logits.into_tensor_arg(),
                into_contiguous(targets).into_tensor_arg(),
                out.clone().into_tensor_arg(),
                lse.clone().into_tensor_arg(),
                block,
            );
            (out, lse)
        }

        fn slsm_backward(
            logits: FloatTensor<Self>,
            targets: IntTensor<Self>,
            lse: FloatTensor<Self>,
            grad: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            let shape = logits.meta.shape().clone();
            let (n, block) = (shape[0], block_for(shape[1]));
            let client = logits.client.clone();
            let out = empty_device::<R, F>(client.clone(), logits.device.clone(), shape);
            slsm_bwd_kernel::launch::<F, I, R>(
                &client,
                grid(n),
                CubeDim::new_1d(block as u32),
                logits.into_tensor_arg(),
                into_contiguous(targets).into_tensor_arg(),
                lse.into_tensor_arg(),
                grad.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                block,
            );
            out
        }
    }

    #[derive(Clone, Debug)]
    struct FwdOp<B> {
        desc: CustomOpIr,
        _b: PhantomData<B>,
    }

    impl<B: FusionBackend + SelectiveLogSoftmaxBackend> Operation<B::FusionRuntime> for FwdOp<B> {
        fn execute(
            &self,
            h: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
        ) {
            let ([x, t], [out, lse]) = self.desc.as_fixed();
            let (o, l) = B::slsm_forward(h.get_float_tensor::<B>(x), h.get_int_tensor::<B>(t));
            h.register_float_tensor::<B>(&out.id, o);
            h.register_float_tensor::<B>(&lse.id, l);
        }
    }

    #[derive(Clone, Debug)]
    struct BwdOp<B> {
        desc: CustomOpIr,
        _b: PhantomData<B>,
    }

    impl<B: FusionBackend + SelectiveLogSoftmaxBackend> Operation<B::FusionRuntime> for BwdOp<B> {
        fn execute(
            &self,
            h: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
        ) {
            let ([x, t, lse, g], [out]) = self.desc.as_fixed();
            let o = B::slsm_backward(
                h.get_float_tensor::<B>(x),
                h.get_int_tensor::<B>(t),
                h.get_float_tensor::<B>(lse),
                h.get_float_tensor::<B>(g),
            );
            h.register_float_tensor::<B>(&out.id, o);
        }
    }

    impl<B: FusionBackend + SelectiveLogSoftmaxBackend> SelectiveLogSoftmaxBackend for Fusion<B> {
        fn slsm_forward(
            x: FloatTensor<Self>,
            t: IntTensor<Self>,
        ) -> (FloatTensor<Self>, FloatTensor<Self>) {
            let (client, n, dtype) = (x.client.clone(), x.shape[0], x.dtype);
            let streams = OperationStreams::with_inputs([&x, &t]);
            let out = TensorIr::uninit(client.create_empty_handle(), Shape::new([n]), dtype);
            let lse = TensorIr::uninit(client.create_empty_handle(), Shape::new([n]), dtype);
            let desc = CustomOpIr::new(
                "slsm_forward",
                &[x.clone().into_ir(), t.clone().into_ir()],
                &[out, lse],
            );
            let [o, l]: [_; 2] = client
                .register(
                    streams,
                    OperationIr::Custom(desc.clone()),
                    FwdOp::<B> {
                        desc,
                        _b: PhantomData,
                    },
                )
                .try_into()
                .expect("two outputs");
            (o, l)
        }

        fn slsm_backward(
            x: FloatTensor<Self>,
            t: IntTensor<Self>,
            lse: FloatTensor<Self>,
            g: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            let (client, shape, dtype) = (x.client.clone(), x.shape.clone(), x.dtype);
            let streams = OperationStreams::with_inputs([&x, &t, &lse, &g]);
            let out = TensorIr::uninit(client.create_empty_handle(), shape, dtype);
            let desc = CustomOpIr::new(
                "slsm_backward",
                &[
                    x.clone().into_ir(),
                    t.clone().into_ir(),
                    lse.clone().into_ir(),
                    g.clone().into_ir(),
                ],
                &[out],
            );
            let [o]: [_; 1] = client
                .register(
                    streams,
                    OperationIr::Custom(desc.clone()),
                    BwdOp::<B> {
                        desc,
                        _b: PhantomData,
                    },
                )
                .try_into()
                .expect("one output");
            o
        }
    }
}
