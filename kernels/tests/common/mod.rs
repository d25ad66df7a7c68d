//! What every kernel test file shares: whether wgpu has an adapter (with `REQUIRE_WGPU=1`, as in CI,
//! a missing one fails the test instead of skipping it), and a macro that runs a file's
//! `check::<B>(name, &device, dtype)` on every backend and float type compiled in, with helpers to
//! build tensors of a float type from host values.

// Each test file uses a subset of these helpers.
#![allow(dead_code)]

/// `xs` rounded to `dtype` and back: the values a tensor of that type holds, from which the f64
/// references are computed.
pub fn rounded(xs: &[f32], dtype: burn::tensor::DType) -> Vec<f32> {
    use burn::tensor::DType;
    use half::{bf16, f16};
    match dtype {
        DType::F16 => xs.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
        DType::BF16 => xs.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
        _ => xs.to_vec(),
    }
}

/// Whether this backend's f32 matmuls run as TF32 (inputs rounded to 10 mantissa bits, f32
/// accumulation): CubeCL picks tensor-core TF32 for f32 operands on CUDA devices that have it
/// (Ampere and later; seen on an H200), as PyTorch does with `allow_tf32`. Tests judge f32
/// products there at TF32's precision. `name` is the backend name the test macro passes.
pub fn f32_matmul_is_tf32(name: &str) -> bool {
    name.starts_with("cuda")
}

/// A float tensor of `dtype` holding `xs` (already [`rounded`] to it).
pub fn tensor<B: burn::tensor::backend::Backend, const D: usize>(
    xs: &[f32],
    shape: [usize; D],
    dtype: burn::tensor::DType,
    device: &B::Device,
) -> burn::tensor::Tensor<B, D> {
    let data = burn::tensor::TensorData::new(xs.to_vec(), shape).convert_dtype(dtype);
    burn::tensor::Tensor::from_data(data, (device, dtype))
}

/// A tensor's values as f32 on the host, whatever its float type.
pub fn host<B: burn::tensor::backend::Backend, const D: usize>(
    t: burn::tensor::Tensor<B, D>,
) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// Tests that run `$check::<B>(name, &device, dtype)` on every backend compiled in: the CPU through
/// ndarray (f32) and burn-flex (f32, f16, bf16), all tensor-op fallbacks; wgpu through Fusion and on
/// the raw CubeBackend (f32, and f16 where the adapter has shader-f16); CUDA (`--features
/// cuda,ndarray` on a GPU machine; f32, f16, bf16).
#[macro_export]
macro_rules! on_every_backend {
    ($check:ident) => {
        #[cfg(feature = "ndarray")]
        #[test]
        fn on_the_cpu() {
            $check::<burn::backend::NdArray>(
                "ndarray",
                &Default::default(),
                burn::tensor::DType::F32,
            );
        }

        #[cfg(feature = "flex")]
        #[test]
        fn on_the_cpu_in_f32_f16_and_bf16() {
            use burn::tensor::DType;
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                $check::<burn_flex::Flex>("flex", &Default::default(), dtype);
            }
        }

        #[cfg(feature = "wgpu")]
        #[test]
        fn on_wgpu() {
            use burn::tensor::{DType, backend::Backend};
            if prefer_kernels::device_probe::wgpu_ready("on_wgpu") {
                type Raw =
                    burn_cubecl::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>;
                let device = Default::default();
                let mut dtypes = vec![DType::F32];
                if <burn::backend::Wgpu as Backend>::supports_dtype(&device, DType::F16) {
                    dtypes.push(DType::F16);
                }
                eprintln!("wgpu runs {dtypes:?} (f16 where the adapter has shader-f16)");
                for dtype in dtypes {
                    $check::<burn::backend::Wgpu>("wgpu (fusion)", &device, dtype);
                    $check::<Raw>("wgpu (raw cube backend)", &device, dtype);
                }
            }
        }

        #[cfg(feature = "cuda")]
        #[test]
        fn on_cuda() {
            use burn::tensor::DType;
            type Raw = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;
            let device = burn::backend::cuda::CudaDevice::new(0);
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                $check::<burn::backend::Cuda>("cuda (fusion)", &device, dtype);
                $check::<Raw>("cuda (raw cube backend)", &device, dtype);
            }
        }
    };
}
