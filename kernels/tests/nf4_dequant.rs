//! The NF4 dequantisation kernel against a plain loop on the host, bit for bit: the tensor-op
//! fallback on the CPU, the CubeCL kernel on wgpu (through Fusion and on the raw CubeBackend) and
//! under Autodiff. On wgpu the output buffer is first filled with NaN, so a kernel that silently
//! fails to compile or run cannot pass. With `REQUIRE_WGPU=1` (CI), a missing adapter fails.

mod common;

use burn::tensor::{DType, Int, Tensor, TensorData};
use prefer_kernels::{Nf4DequantBackend, nf4_dequantize};

const TABLE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

struct Case {
    codes: Vec<u8>,
    absmax: Vec<f32>,
    blocksize: usize,
}

fn case(n: usize, blocksize: usize, seed: u64) -> Case {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let codes = (0..n).map(|_| (next() % 16) as u8).collect();
    let absmax = (0..n.div_ceil(blocksize))
        .map(|_| (next() % 10_000) as f32 / 10_000.0 + 0.01)
        .collect();
    Case {
        codes,
        absmax,
        blocksize,
    }
}

fn words(codes: &[u8]) -> Vec<i32> {
    codes
        .chunks(8)
        .map(|c| {
            c.iter()
                .enumerate()
                .fold(0u32, |w, (k, &x)| w | ((x as u32) << (4 * k))) as i32
        })
        .collect()
}

fn run<B: Nf4DequantBackend>(c: &Case, device: &B::Device) -> Vec<f32> {
    let w = words(&c.codes);
    let nw = w.len();
    let codes = Tensor::<B, 1, Int>::from_data(TensorData::new(w, [nw]), (device, DType::I32));
    let table = Tensor::<B, 1>::from_data(TensorData::new(TABLE.to_vec(), [16]), device);
    let absmax =
        Tensor::<B, 1>::from_data(TensorData::new(c.absmax.clone(), [c.absmax.len()]), device);
    // Poison: a NaN-filled tensor of the output's size is created and dropped first, so freshly
    // allocated memory is unlikely to hold a correct answer by accident.
    drop(Tensor::<B, 1>::full([c.codes.len()], f32::NAN, device).into_data());
    nf4_dequantize(codes, table, absmax, c.blocksize, c.codes.len())
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap()
}

fn reference(c: &Case) -> Vec<f32> {
    c.codes
        .iter()
        .enumerate()
        .map(|(i, &q)| TABLE[q as usize] * c.absmax[i / c.blocksize])
        .collect()
}

fn cases() -> Vec<Case> {
    vec![
        case(1, 64, 1),
        case(63, 64, 2),
        case(64 * 7 + 5, 64, 3),
        case(11_264, 32, 4),
        case(300 * 257, 4096, 5),
        case(1 << 21, 64, 6),
    ]
}

fn check<B: Nf4DequantBackend>(name: &str, device: &B::Device) {
    for c in cases() {
        let got = run::<B>(&c, device);
        let want = reference(&c);
        assert_eq!(got.len(), want.len());
        let bad = got
            .iter()
            .zip(&want)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(
            bad.is_none(),
            "{name}, n = {}: element {} is {} instead of {}",
            want.len(),
            bad.unwrap(),
            got[bad.unwrap()],
            want[bad.unwrap()]
        );
    }
}

#[cfg(feature = "ndarray")]
#[test]
fn cpu_fallback_is_exact() {
    check::<burn::backend::NdArray>("ndarray", &Default::default());
    check::<burn::backend::Autodiff<burn::backend::NdArray>>(
        "autodiff<ndarray>",
        &Default::default(),
    );
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_kernel_is_exact() {
    if !prefer_kernels::device_probe::wgpu_ready("nf4_dequant on wgpu") {
        return;
    }
    type Raw = burn_cubecl::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>;
    check::<burn::backend::Wgpu>("wgpu (fusion)", &Default::default());
    check::<Raw>("wgpu (raw cube backend)", &Default::default());
    check::<burn::backend::Autodiff<burn::backend::Wgpu>>("autodiff<wgpu>", &Default::default());
    let _ = <burn::backend::Wgpu as burn::tensor::backend::Backend>::name(&Default::default());
}

/// The same checks on an NVIDIA GPU: `cargo test -p prefer-kernels --features cuda` on a machine
/// with one (CI has none).
#[cfg(feature = "cuda")]
#[test]
fn cuda_kernel_is_exact() {
    type Raw = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;
    let device = burn::backend::cuda::CudaDevice::new(0);
    check::<burn::backend::Cuda>("cuda (fusion)", &device);
    check::<Raw>("cuda (raw cube backend)", &device);
}
