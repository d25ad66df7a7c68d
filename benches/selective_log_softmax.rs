//! Selective log-softmax vs the naive path (log-softmax over the vocabulary, then gather): time of a
//! forward + backward (gradient of the logits) and, on the CPU, peak heap memory above what was
//! held with the logits already in memory, at V ∈ {32 000, 128 256} and N ∈ {1024, 8192}.
//! With `--features wgpu` (or `cuda`) the same runs on that device too (time only: device memory is not
//! on the heap), followed by the forward pass's achieved bandwidth as a fraction of the device's
//! copy bandwidth (the target on a GPU: ≥ 80 %).
//!
//! `cargo bench --profile dev --bench selective_log_softmax [--features wgpu] [-- --quick]
//! [--wgpu-max-mb M] [--device-only]` (`--quick`: N = 1024 only; wgpu skips logits larger than M MB,
//! default 512: lavapipe cannot allocate bigger buffers; `--device-only`: no CPU table, for a GPU
//! machine's short lease, see `tools/gpu_check.sh`)

use std::time::Instant;

#[cfg(any(feature = "wgpu", feature = "cuda"))]
use burn::tensor::DType;
use burn::{
    backend::{Autodiff, NdArray},
    tensor::{Distribution, ElementConversion, Int, Tensor, activation::log_softmax},
};
use prefer::kernels::{SelectiveLogSoftmaxBackend, selective_log_softmax};

#[path = "common/counting_alloc.rs"]
mod counting_alloc;

#[global_allocator]
static ALLOC: counting_alloc::Counting = counting_alloc::Counting;

/// (seconds, peak heap bytes) of forward + backward, after one warm-up run.
fn run<B: SelectiveLogSoftmaxBackend>(
    n: usize,
    v: usize,
    fused: bool,
    device: &B::Device,
) -> (f64, usize) {
    let once = || {
        let logits =
            Tensor::<Autodiff<B>, 2>::random([n, v], Distribution::Uniform(-8.0, 8.0), device)
                .require_grad();
        let targets = Tensor::<Autodiff<B>, 1, Int>::random(
            [n],
            Distribution::Uniform(0.0, v as f64),
            device,
        );
        B::sync(device).unwrap();
        let base = counting_alloc::reset();
        let t = Instant::now();
        let logp = if fused {
            selective_log_softmax(logits.clone(), targets)
        } else {
            log_softmax(logits.clone(), 1)
                .gather(1, targets.reshape([n, 1]))
                .reshape([n])
        };
        let grads = logp.sum().backward();
        let g = logits.grad(&grads).unwrap();
        B::sync(device).unwrap();
        let secs = t.elapsed().as_secs_f64();
        let peak = counting_alloc::peak_above(base);
        assert!(g.sum().into_scalar().elem::<f64>().is_finite());
        (secs, peak)
    };
    once();
    once()
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
/// Forward-only bandwidth on a device: the selective log-softmax reads the `[N, V]` logits once;
/// a copy (`x · 1.5`) reads and writes them. Returns (copy GB/s, forward GB/s), best of 5.
fn bandwidth<B: SelectiveLogSoftmaxBackend>(
    n: usize,
    v: usize,
    dtype: DType,
    device: &B::Device,
) -> (f64, f64) {
    let logits =
        Tensor::<B, 2>::random([n, v], Distribution::Uniform(-8.0, 8.0), device).cast(dtype);
    let targets = Tensor::<B, 1, Int>::random([n], Distribution::Uniform(0.0, v as f64), device);
    let bytes = (n * v * logits.dtype().size()) as f64;
    // Each result is held until after the sync: a fused backend may skip work whose output is
    // dropped unread.
    let best = |f: &dyn Fn() -> Tensor<B, 1>| {
        let warm = f();
        B::sync(device).unwrap();
        drop(warm);
        (0..5)
            .map(|_| {
                let t = Instant::now();
                let out = f();
                B::sync(device).unwrap();
                let secs = t.elapsed().as_secs_f64();
                drop(out);
                secs
            })
            .fold(f64::INFINITY, f64::min)
    };
    let copy = best(&|| logits.clone().mul_scalar(1.5).reshape([n * v]));
    let fwd = best(&|| selective_log_softmax(logits.clone(), targets.clone()));
    (2.0 * bytes / copy / 1e9, bytes / fwd / 1e9)
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn bandwidth_table<B: SelectiveLogSoftmaxBackend>(
    name: &str,
    device: &B::Device,
    dtypes: &[DType],
    max_bytes: usize,
) {
    println!("{name}: selective log-softmax forward bandwidth vs copy bandwidth");
    println!(
        "{:>6} {:>7} {:>5} | {:>10} {:>10} | fraction",
        "N", "V", "dtype", "copy GB/s", "fwd GB/s"
    );
    for &dtype in dtypes {
        for n in [1024, 8192] {
            for v in [32_000, 128_256] {
                if n * v * 4 > max_bytes {
                    continue;
                }
                let (copy, fwd) = bandwidth::<B>(n, v, dtype, device);
                println!(
                    "{n:>6} {v:>7} {:>5} | {copy:>10.1} {fwd:>10.1} | {:.0} %",
                    format!("{dtype:?}").to_lowercase(),
                    100.0 * fwd / copy
                );
            }
        }
    }
}

/// `max_bytes`: the largest logits tensor the device can hold in one buffer.
fn table<B: SelectiveLogSoftmaxBackend>(
    name: &str,
    device: &B::Device,
    quick: bool,
    heap: bool,
    max_bytes: usize,
) {
    println!("{name}: forward + backward (d logits)");
    println!(
        "{:>6} {:>7} | {:>9} {:>11} | {:>9} {:>11}",
        "N", "V", "naive s", "naive peak", "fused s", "fused peak"
    );
    let mb = |b: usize| {
        if heap {
            format!("{:.1}MB", b as f64 / 1e6)
        } else {
            "-".into()
        }
    };
    for n in [1024, 8192] {
        if quick && n > 1024 {
            continue;
        }
        for v in [32_000, 128_256] {
            // The naive path holds ~4 [N, V] f32 tensors besides the logits; skip what would not
            // fit comfortably in this machine's memory.
            if 5 * n * v * 4 > 16_000_000_000 {
                println!(
                    "{n:>6} {v:>7} | not run (≈{:.1} GB)",
                    5.0 * (n * v * 4) as f64 / 1e9
                );
                continue;
            }
            if n * v * 4 > max_bytes {
                println!("{n:>6} {v:>7} | not run (logits larger than one device buffer)");
                continue;
            }
            let (fs, fp) = run::<B>(n, v, true, device);
            let (ns, np) = run::<B>(n, v, false, device);
            println!(
                "{n:>6} {v:>7} | {ns:>9.3} {:>11} | {fs:>9.3} {:>11}",
                mb(np),
                mb(fp)
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    if !args.iter().any(|a| a == "--device-only") {
        table::<NdArray>(
            "ndarray (tensor-op fallback)",
            &Default::default(),
            quick,
            true,
            usize::MAX,
        );
    }
    #[cfg(feature = "wgpu")]
    {
        let max_mb: usize = args
            .iter()
            .position(|a| a == "--wgpu-max-mb")
            .and_then(|i| args.get(i + 1)?.parse().ok())
            .unwrap_or(512);
        let device = Default::default();
        type Wgpu = burn::backend::Wgpu;
        table::<Wgpu>(
            "wgpu (CubeCL kernel)",
            &device,
            quick,
            false,
            max_mb * 1_000_000,
        );
        bandwidth_table::<Wgpu>("wgpu", &device, &[DType::F32], max_mb * 1_000_000);
    }
    #[cfg(feature = "cuda")]
    {
        let device = burn::backend::cuda::CudaDevice::new(0);
        type Cuda = burn::backend::Cuda;
        table::<Cuda>("cuda (CubeCL kernel)", &device, quick, false, usize::MAX);
        bandwidth_table::<Cuda>("cuda", &device, &[DType::F32, DType::BF16], usize::MAX);
    }
}
