//! NF4 dequantisation: packed 4-bit codes (eight per i32 word, element `8w + k` in bits `4k..4k+4`)
//! and one scale per block → f32 values `table[code] · absmax[i / blocksize]`.

use burn::{
    backend::Autodiff,
    backend::autodiff::checkpoint::strategy::CheckpointStrategy,
    tensor::{
        ElementConversion, Int, Tensor, TensorPrimitive,
        backend::{AutodiffBackend, Backend},
        ops::{FloatTensor, IntTensor},
    },
};

/// Dequantises NF4 codes.
pub trait Nf4DequantBackend: Backend {
    /// `codes`: `ceil(n/8)` i32 words; `table`: the 16 levels; `absmax`: one scale per block.
    /// Returns `n` values, `table[code_i] · absmax[i / blocksize]`, computed in f32 with one
    /// multiplication, so every implementation gives the same bits.
    ///
    /// The default implementation uses tensor operations and runs on any backend.
    fn nf4_dequantize(
        codes: IntTensor<Self>,
        table: FloatTensor<Self>,
        absmax: FloatTensor<Self>,
        blocksize: usize,
        n: usize,
    ) -> FloatTensor<Self> {
        tensor_ops::<Self>(codes, table, absmax, blocksize, n)
    }
}

/// The dequantisation with tensor operations, for any backend.
fn tensor_ops<B: Backend>(
    codes: IntTensor<B>,
    table: FloatTensor<B>,
    absmax: FloatTensor<B>,
    blocksize: usize,
    n: usize,
) -> FloatTensor<B> {
    let words = Tensor::<B, 1, Int>::from_primitive(codes);
    let table = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(table));
    let absmax = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(absmax));
    let nb = absmax.dims()[0];
    let nibbles: Vec<_> = (0..8)
        .map(|k| {
            words
                .clone()
                .bitwise_right_shift_scalar((4 * k).elem())
                .bitwise_and_scalar(15.elem())
        })
        .collect();
    let idx = Tensor::stack::<2>(nibbles, 1).reshape([-1]);
    // Codes cover at least `n` values; pad them to whole blocks for the per-block product.
    let m = idx.dims()[0].min(nb * blocksize);
    let mut levels = table.select(0, idx.narrow(0, 0, m));
    if m < nb * blocksize {
        let device = levels.device();
        levels = Tensor::cat(
            vec![levels, Tensor::zeros([nb * blocksize - m], &device)],
            0,
        );
    }
    let levels = levels.reshape([nb, blocksize]);
    let out = (levels * absmax.unsqueeze_dim(1))
        .reshape([-1])
        .narrow(0, 0, n);
    out.into_primitive().tensor()
}

/// Dequantises NF4 codes on whichever backend `B` is (see [`Nf4DequantBackend::nf4_dequantize`]).
pub fn nf4_dequantize<B: Nf4DequantBackend>(
    codes: Tensor<B, 1, Int>,
    table: Tensor<B, 1>,
    absmax: Tensor<B, 1>,
    blocksize: usize,
    n: usize,
) -> Tensor<B, 1> {
    let out = B::nf4_dequantize(
        codes.into_primitive(),
        table.into_primitive().tensor(),
        absmax.into_primitive().tensor(),
        blocksize,
        n,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[cfg(feature = "ndarray")]
impl Nf4DequantBackend for burn::backend::NdArray {}

#[cfg(feature = "flex")]
mod flex {
    use burn::tensor::ops::{FloatTensor, IntTensor};
    use burn_flex::Flex;

    use super::Nf4DequantBackend;
    use crate::cpu::{f32_slice, is_f32, par_chunks, store};

    /// Parallel over blocks of the output: the 16 levels in a register-sized table, one product
    /// per element, the same bits as the tensor-op path.
    impl Nf4DequantBackend for Flex {
        fn nf4_dequantize(
            codes: IntTensor<Self>,
            table: FloatTensor<Self>,
            absmax: FloatTensor<Self>,
            blocksize: usize,
            n: usize,
        ) -> FloatTensor<Self> {
            let blocksize = blocksize.max(1);
            let covered = codes.layout().shape().num_elements() * 8 >= n
                && absmax.layout().shape().num_elements() * blocksize >= n;
            if !is_f32(&[&table, &absmax]) || !covered {
                return super::tensor_ops::<Self>(codes, table, absmax, blocksize, n);
            }
            let words: Vec<i32> = codes
                .to_contiguous()
                .into_data()
                .convert::<i32>()
                .into_vec::<i32>()
                .unwrap_or_default();
            let dtype = table.dtype();
            let lut: Vec<f32> = f32_slice(&table).to_vec();
            let scales = f32_slice(&absmax);
            let mut out = vec![0f32; n];
            par_chunks(&mut out, blocksize, |b, block| {
                let s = scales[b];
                for (k, o) in block.iter_mut().enumerate() {
                    let i = b * blocksize + k;
                    let code = (words[i / 8] as u32 >> (4 * (i % 8))) & 15;
                    *o = lut[code as usize] * s;
                }
            });
            store(out, [n].into(), dtype)
        }
    }
}

/// The weights are frozen: no gradient flows into codes or scales, so the inner result is wrapped
/// as a constant.
impl<B: Nf4DequantBackend, C: CheckpointStrategy> Nf4DequantBackend for Autodiff<B, C> {
    fn nf4_dequantize(
        codes: IntTensor<Self>,
        table: FloatTensor<Self>,
        absmax: FloatTensor<Self>,
        blocksize: usize,
        n: usize,
    ) -> FloatTensor<Self> {
        let out = B::nf4_dequantize(codes, table.primitive, absmax.primitive, blocksize, n);
        <Self as AutodiffBackend>::from_inner(out)
    }
}

#[cfg(feature = "cube")]
mod cube {
    use burn::tensor::{
        Shape,
        ops::{FloatTensor, IntTensor},
    };
    use burn_cubecl::{
        BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement, kernel::into_contiguous,
        ops::numeric::empty_device,
    };
    use burn_fusion::{Fusion, FusionBackend};
    use cubecl::prelude::*;

    use super::Nf4DequantBackend;
    use crate::{cube_grid::grid, fusion_op::custom_op};

    /// One unit per output value.
    #[cube(launch)]
    fn nf4_dequant_kernel<F: Float, I: Int>(
        codes: &Tensor<I>,
        table: &Tensor<F>,
        absmax: &Tensor<F>,
        out: &mut Tensor<F>,
        #[comptime] blocksize: usize,
    ) {
        let i = ABSOLUTE_POS;
        if i >= out.len() {
            terminate!();
        }
        let word = u32::cast_from(codes[i / 8]);
        let shift = u32::cast_from((i % 8) * 4);
        let code = usize::cast_from((word >> shift) & 15u32);
        out[i] = table[code] * absmax[i / blocksize];
    }

    const CUBE: u32 = 256;

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> Nf4DequantBackend
        for CubeBackend<R, F, I, BT>
    {
        fn nf4_dequantize(
            codes: IntTensor<Self>,
            table: FloatTensor<Self>,
            absmax: FloatTensor<Self>,
            blocksize: usize,
            n: usize,
        ) -> FloatTensor<Self> {
            let (codes, table, absmax) = (
                into_contiguous(codes),
                into_contiguous(table),
                into_contiguous(absmax),
            );
            let client = table.client.clone();
            let out = empty_device::<R, F>(client.clone(), table.device.clone(), Shape::new([n]));
            nf4_dequant_kernel::launch::<F, I, R>(
                &client,
                grid(n.div_ceil(CUBE as usize)),
                CubeDim::new_1d(CUBE),
                codes.into_tensor_arg(),
                table.into_tensor_arg(),
                absmax.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                blocksize,
            );
            out
        }
    }

    /// Custom operations are not fused: the kernel runs as its own step in the stream.
    impl<B: FusionBackend + Nf4DequantBackend> Nf4DequantBackend for Fusion<B> {
        fn nf4_dequantize(
            codes: IntTensor<Self>,
            table: FloatTensor<Self>,
            absmax: FloatTensor<Self>,
            blocksize: usize,
            n: usize,
        ) -> FloatTensor<Self> {
            let outputs = [(Shape::new([n]), table.dtype)];
            let inputs = [&codes, &table, &absmax];
            let [result] = custom_op::<B, 1>("nf4_dequantize", &inputs, outputs, move |desc, h| {
                let ([codes, table, absmax], [out]) = desc.as_fixed();
                let result = B::nf4_dequantize(
                    h.get_int_tensor::<B>(codes),
                    h.get_float_tensor::<B>(table),
                    h.get_float_tensor::<B>(absmax),
                    blocksize,
                    n,
                );
                h.register_float_tensor::<B>(&out.id, result);
            });
            result
        }
    }
}
