//! What every kernel test file shares: whether wgpu has an adapter (with `REQUIRE_WGPU=1`, as in CI,
//! a missing one fails the test instead of skipping it), and a macro that runs a file's
//! `check::<B>(name, &device)` on every backend compiled in.

/// Whether wgpu found an adapter; panics under `REQUIRE_WGPU=1` when it did not.
#[cfg(feature = "wgpu")]
pub fn wgpu_ready() -> bool {
    let ok = std::thread::spawn(|| {
        std::panic::catch_unwind(|| {
            burn::tensor::Tensor::<burn::backend::Wgpu, 1>::ones([1], &Default::default())
                .into_data();
        })
        .is_ok()
    })
    .join()
    .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var("REQUIRE_WGPU").map_or(true, |v| v != "1"),
            "REQUIRE_WGPU=1 but no wgpu adapter was found (install mesa-vulkan-drivers)"
        );
        eprintln!("skipped: no wgpu adapter");
    }
    ok
}

/// Tests that run `$check` on the CPU (tensor-op fallback), on wgpu through Fusion and on the raw
/// CubeBackend, and on CUDA (`--features cuda,ndarray` on a GPU machine), each where compiled in.
#[macro_export]
macro_rules! on_every_backend {
    ($check:ident) => {
        #[cfg(feature = "ndarray")]
        #[test]
        fn on_the_cpu() {
            $check::<burn::backend::NdArray>("ndarray", &Default::default());
        }

        #[cfg(feature = "wgpu")]
        #[test]
        fn on_wgpu() {
            if common::wgpu_ready() {
                type Raw =
                    burn_cubecl::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>;
                $check::<burn::backend::Wgpu>("wgpu (fusion)", &Default::default());
                $check::<Raw>("wgpu (raw cube backend)", &Default::default());
            }
        }

        #[cfg(feature = "cuda")]
        #[test]
        fn on_cuda() {
            type Raw = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;
            let device = burn::backend::cuda::CudaDevice::new(0);
            $check::<burn::backend::Cuda>("cuda (fusion)", &device);
            $check::<Raw>("cuda (raw cube backend)", &device);
        }
    };
}
