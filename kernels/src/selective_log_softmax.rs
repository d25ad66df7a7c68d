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
        DType, Int, Tensor, TensorPrimitive,
        backend::{AutodiffBackend, Backend},
        ops::{FloatTensor, IntTensor},
    },
};

/// The selective log-softmax operations. `logp` and the gradient have the logits' float type;
/// the arithmetic, and the saved log-sum-exp, are f32 whatever the input type (f16/bf16 logits
/// would otherwise lose the log-sum-exp to rounding).
pub trait SelectiveLogSoftmaxBackend: Backend {
    /// `logits` `[N, V]`, `targets` `[N]` → (`logp` `[N]`, `lse` `[N]` in f32). The default
    /// implementation uses tensor operations (it materialises one `[N, V]` temporary).
    fn slsm_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let x = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(logits));
        let dtype = x.dtype();
        let x = x.cast(DType::F32);
        let t = Tensor::<Self, 1, Int>::from_primitive(targets);
        let max = x.clone().max_dim(1);
        let lse = (x.clone() - max.clone()).exp().sum_dim(1).log() + max;
        let n = t.dims()[0];
        let picked = x.gather(1, t.reshape([n, 1]));
        let logp = (picked - lse.clone()).reshape([n]).cast(dtype);
        (
            logp.into_primitive().tensor(),
            lse.reshape([n]).into_primitive().tensor(),
        )
    }

    /// `dlogits[r, c] = grad[r] · (1{c = t[r]} − exp(x[r, c] − lse[r]))`, `[N, V]`, from the f32
    /// `lse` of the forward pass. A target outside `[0, V)` has no one-hot term: the chunked LM head
    /// passes the rows whose target lies in another chunk that way.
    fn slsm_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let x = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(logits));
        let dtype = x.dtype();
        let x = x.cast(DType::F32);
        let [n, v] = x.dims();
        let t = Tensor::<Self, 1, Int>::from_primitive(targets);
        let inside = t
            .clone()
            .greater_equal_elem(0)
            .bool_and(t.clone().lower_elem(v as i64))
            .float()
            .cast(DType::F32);
        let t = t.clamp(0, v as i64 - 1).reshape([n, 1]);
        let lse = Tensor::<Self, 1>::from_primitive(TensorPrimitive::Float(lse)).reshape([n, 1]);
        let g = Tensor::<Self, 1>::from_primitive(TensorPrimitive::Float(grad)).cast(DType::F32);
        let hit = (g.clone() * inside).reshape([n, 1]);
        // −g·softmax everywhere, then +g at each row's target: no one-hot `[N, V]` is built.
        ((x - lse).exp() * g.reshape([n, 1]).neg())
            .scatter(1, t, hit, burn::tensor::IndexingUpdateOp::Add)
            .cast(dtype)
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

#[cfg(feature = "flex")]
impl SelectiveLogSoftmaxBackend for burn_flex::Flex {}

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
    use burn::tensor::{
        DType, Shape,
        ops::{FloatTensor, IntTensor},
    };
    use burn_cubecl::{
        BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement, kernel::into_contiguous,
        ops::numeric::empty_device_dtype, tensor::CubeTensor,
    };
    use burn_fusion::{Fusion, FusionBackend};
    use cubecl::{features::Plane, prelude::*, tensor_vector_size_parallel};

    use super::SelectiveLogSoftmaxBackend;
    use crate::{cube_grid::grid, fusion_op::custom_op};

    /// One cube per row, reading the row in vectors of `N` elements. Each unit keeps an online
    /// (max, sum of exponentials) pair over its strided vectors in f32, whatever the input type;
    /// the pairs are merged by plane reductions and one shared-memory slot per plane, or by a
    /// shared-memory tree where the device has no plane operations.
    #[cube(launch)]
    fn slsm_fwd_kernel<F: Float, I: Int, N: Size>(
        logits: &Tensor<Vector<F, N>>,
        targets: &Tensor<I>,
        out: &mut Tensor<F>,
        lse: &mut Tensor<f32>,
        #[comptime] block: usize,
        #[comptime] planes: bool,
        #[define(F, I)] _dtypes: [StorageType; 2],
    ) {
        let row = CUBE_POS;
        if row >= logits.shape(0) {
            terminate!();
        }
        let tid = UNIT_POS as usize;
        let width = logits.vector_size();
        let vectors = logits.shape(1) / width;
        let base = row * logits.stride(0) / width;
        let mut m = f32::new(-3.0e38);
        let mut s = f32::new(0.0);
        let mut i = tid;
        while i < vectors {
            let x = logits[base + i];
            let mut vm = f32::cast_from(x[0]);
            #[unroll]
            for k in 1..width {
                vm = vm.max(f32::cast_from(x[k]));
            }
            let nm = m.max(vm);
            let mut acc = f32::new(0.0);
            #[unroll]
            for k in 0..width {
                acc += (f32::cast_from(x[k]) - nm).exp();
            }
            s = s * (m - nm).exp() + acc;
            m = nm;
            i += block;
        }
        let mut sm = SharedMemory::<f32>::new(block);
        let mut ss = SharedMemory::<f32>::new(block);
        if planes {
            let pm = plane_max(m);
            let ps = plane_sum(s * (m - pm).exp());
            if UNIT_POS_PLANE == 0 {
                let p = PLANE_POS as usize;
                sm[p] = pm;
                ss[p] = ps;
            }
            sync_cube();
            if tid == 0 {
                let count = block / PLANE_DIM as usize;
                for p in 1..count {
                    let (m1, m2) = (sm[0], sm[p]);
                    let nm = m1.max(m2);
                    ss[0] = ss[0] * (m1 - nm).exp() + ss[p] * (m2 - nm).exp();
                    sm[0] = nm;
                }
            }
        } else {
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
        }
        if tid == 0 {
            let l = sm[0] + ss[0].ln();
            lse[row * lse.stride(0)] = l;
            let t = usize::cast_from(targets[row * targets.stride(0)]);
            let x = logits[base + t / width];
            let lane = t % width;
            let mut xt = f32::new(0.0);
            #[unroll]
            for k in 0..width {
                if k == lane {
                    xt = f32::cast_from(x[k]);
                }
            }
            out[row * out.stride(0)] = F::cast_from(xt - l);
        }
    }

    /// One cube per row; each unit writes its strided vectors of the gradient, in f32 arithmetic. A
    /// target outside the row (negative ones wrap to huge) matches no column.
    #[cube(launch)]
    fn slsm_bwd_kernel<F: Float, I: Int, N: Size>(
        logits: &Tensor<Vector<F, N>>,
        targets: &Tensor<I>,
        lse: &Tensor<f32>,
        grad: &Tensor<F>,
        out: &mut Tensor<Vector<F, N>>,
        #[comptime] block: usize,
        #[define(F, I)] _dtypes: [StorageType; 2],
    ) {
        let row = CUBE_POS;
        if row >= logits.shape(0) {
            terminate!();
        }
        let width = logits.vector_size();
        let vectors = logits.shape(1) / width;
        let base = row * logits.stride(0) / width;
        let obase = row * out.stride(0) / width;
        let l = lse[row * lse.stride(0)];
        let g = f32::cast_from(grad[row * grad.stride(0)]);
        let t = usize::cast_from(targets[row * targets.stride(0)]);
        let mut i = UNIT_POS as usize;
        while i < vectors {
            let x = logits[base + i];
            let mut o = Vector::<F, N>::empty();
            #[unroll]
            for k in 0..width {
                let p = (f32::cast_from(x[k]) - l).exp();
                let hit = if i * width + k == t {
                    f32::new(1.0)
                } else {
                    f32::new(0.0)
                };
                o[k] = F::cast_from(g * (hit - p));
            }
            out[obase + i] = o;
            i += block;
        }
    }

    /// How a row is read and reduced on this device: the vector width, the units per cube and
    /// whether plane operations merge the units' partial results.
    struct Layout {
        width: usize,
        block: usize,
        planes: bool,
    }

    fn layout<R: CubeRuntime>(logits: &CubeTensor<R>, allow_planes: bool) -> Layout {
        let client = &logits.client;
        let width = tensor_vector_size_parallel(
            client.io_optimized_vector_sizes(logits.dtype.size()),
            logits.meta.shape(),
            logits.meta.strides(),
            1,
        );
        let props = client.properties();
        let planes = allow_planes && props.features.plane.contains(Plane::Ops);
        let vectors = logits.meta.shape()[1] / width;
        let mut block = vectors.next_power_of_two().clamp(32, 256);
        if planes {
            // Every plane must be full: at least one plane per cube.
            block = block.max(props.hardware.plane_size_max as usize);
        }
        Layout {
            width,
            block: block.min(props.hardware.max_units_per_cube as usize),
            planes,
        }
    }

    /// The forward launch; `allow_planes: false` forces the shared-memory tree (tested against the
    /// plane path on devices that have both).
    fn forward<R: CubeRuntime>(
        logits: CubeTensor<R>,
        targets: CubeTensor<R>,
        allow_planes: bool,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        let logits = rows_contiguous(logits);
        let n = logits.meta.shape()[0];
        let Layout {
            width,
            block,
            planes,
        } = layout(&logits, allow_planes);
        let (client, device, dtype) = (logits.client.clone(), logits.device.clone(), logits.dtype);
        let targets = into_contiguous(targets);
        let out = empty_device_dtype(client.clone(), device.clone(), Shape::new([n]), dtype);
        let lse = empty_device_dtype(client.clone(), device, Shape::new([n]), DType::F32);
        let dtypes = [dtype.into(), targets.dtype.into()];
        slsm_fwd_kernel::launch(
            &client,
            grid(n),
            CubeDim::new_1d(block as u32),
            width,
            logits.into_tensor_arg(),
            targets.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            block,
            planes,
            dtypes,
        );
        (out, lse)
    }

    /// Rows must be contiguous for vector loads.
    fn rows_contiguous<R: CubeRuntime>(logits: CubeTensor<R>) -> CubeTensor<R> {
        if logits.meta.strides()[1] == 1 {
            logits
        } else {
            into_contiguous(logits)
        }
    }

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> SelectiveLogSoftmaxBackend
        for CubeBackend<R, F, I, BT>
    {
        fn slsm_forward(
            logits: FloatTensor<Self>,
            targets: IntTensor<Self>,
        ) -> (FloatTensor<Self>, FloatTensor<Self>) {
            forward(logits, targets, true)
        }

        fn slsm_backward(
            logits: FloatTensor<Self>,
            targets: IntTensor<Self>,
            lse: FloatTensor<Self>,
            grad: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            let logits = rows_contiguous(logits);
            let shape = logits.meta.shape().clone();
            let Layout { width, block, .. } = layout(&logits, false);
            let (client, dtype) = (logits.client.clone(), logits.dtype);
            let out =
                empty_device_dtype(client.clone(), logits.device.clone(), shape.clone(), dtype);
            let targets = into_contiguous(targets);
            let dtypes = [dtype.into(), targets.dtype.into()];
            slsm_bwd_kernel::launch(
                &client,
                grid(shape[0]),
                CubeDim::new_1d(block as u32),
                width,
                logits.into_tensor_arg(),
                targets.into_tensor_arg(),
                lse.into_tensor_arg(),
                grad.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                block,
                dtypes,
            );
            out
        }
    }

    impl<B: FusionBackend + SelectiveLogSoftmaxBackend> SelectiveLogSoftmaxBackend for Fusion<B> {
        fn slsm_forward(
            x: FloatTensor<Self>,
            t: IntTensor<Self>,
        ) -> (FloatTensor<Self>, FloatTensor<Self>) {
            let n = Shape::new([x.shape[0]]);
            let outputs = [(n.clone(), x.dtype), (n, DType::F32)];
            let [logp, lse] = custom_op::<B, 2>("slsm_forward", &[&x, &t], outputs, |desc, h| {
                let ([x, t], [logp, lse]) = desc.as_fixed();
                let (o, l) = B::slsm_forward(h.get_float_tensor::<B>(x), h.get_int_tensor::<B>(t));
                h.register_float_tensor::<B>(&logp.id, o);
                h.register_float_tensor::<B>(&lse.id, l);
            });
            (logp, lse)
        }

        fn slsm_backward(
            x: FloatTensor<Self>,
            t: IntTensor<Self>,
            lse: FloatTensor<Self>,
            g: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            let outputs = [(x.shape.clone(), x.dtype)];
            let [dx] =
                custom_op::<B, 1>("slsm_backward", &[&x, &t, &lse, &g], outputs, |desc, h| {
                    let ([x, t, lse, g], [dx]) = desc.as_fixed();
                    let o = B::slsm_backward(
                        h.get_float_tensor::<B>(x),
                        h.get_int_tensor::<B>(t),
                        h.get_float_tensor::<B>(lse),
                        h.get_float_tensor::<B>(g),
                    );
                    h.register_float_tensor::<B>(&dx.id, o);
                });
            dx
        }
    }

    /// The plane reduction and the shared-memory tree give the same row statistics, at vector
    /// widths 4 (V = 1000), 2 (V = 514) and 1 (V = 33). Where the device has no plane operations
    /// (lavapipe: cubecl turns them off on CPU adapters) both runs take the tree; CUDA and GPU
    /// adapters run both.
    #[cfg(test)]
    mod tests {
        use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};
        use burn_cubecl::{CubeBackend, CubeRuntime};

        fn agree<R: CubeRuntime>(device: &R::Device) {
            type Raw<R> = CubeBackend<R, f32, i32, u32>;
            let probe = Tensor::<Raw<R>, 1>::ones([1], device)
                .into_primitive()
                .tensor();
            let props = probe.client.properties();
            eprintln!(
                "plane operations: {:?}, plane size {}..{}",
                props.features.plane, props.hardware.plane_size_min, props.hardware.plane_size_max
            );
            for (n, v) in [(6, 1000), (5, 514), (3, 33)] {
                let xs: Vec<f32> = (0..n * v)
                    .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * 8.0)
                    .collect();
                let ts: Vec<i64> = (0..n).map(|r| ((r * 131) % v) as i64).collect();
                let run = |planes: bool| {
                    let x =
                        Tensor::<Raw<R>, 2>::from_data(TensorData::new(xs.clone(), [n, v]), device);
                    let t = Tensor::<Raw<R>, 1, Int>::from_data(
                        TensorData::new(ts.clone(), [n]),
                        device,
                    );
                    let (o, l) =
                        super::forward(x.into_primitive().tensor(), t.into_primitive(), planes);
                    let host = |p| {
                        Tensor::<Raw<R>, 1>::from_primitive(TensorPrimitive::Float(p))
                            .into_data()
                            .to_vec::<f32>()
                            .unwrap()
                    };
                    (host(o), host(l))
                };
                let (plane, tree) = (run(true), run(false));
                for r in 0..n {
                    let row = &xs[r * v..(r + 1) * v];
                    let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
                    let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
                    let logp = row[ts[r] as usize] as f64 - lse;
                    for (what, (o, l)) in [("plane", &plane), ("tree", &tree)] {
                        let (o, l) = (o[r] as f64, l[r] as f64);
                        assert!((l - lse).abs() <= 1e-5 * lse.abs(), "{what} lse row {r}");
                        assert!(
                            (o - logp).abs() <= 1e-5 * logp.abs().max(1.0),
                            "{what} logp row {r}"
                        );
                    }
                }
            }
        }

        #[cfg(feature = "wgpu")]
        #[test]
        fn plane_and_tree_reductions_agree_on_wgpu() {
            if crate::device_probe::wgpu_ready("plane_and_tree_reductions_agree_on_wgpu") {
                agree::<cubecl::wgpu::WgpuRuntime>(&Default::default());
            }
        }

        #[cfg(feature = "cuda")]
        #[test]
        fn plane_and_tree_reductions_agree_on_cuda() {
            agree::<cubecl::cuda::CudaRuntime>(&Default::default());
        }
    }
}
