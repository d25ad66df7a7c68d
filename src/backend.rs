//! Backends chosen at run time among those compiled in (`ndarray`, `flex`, `wgpu`, `cuda` cargo
//! features).
//!
//! Model code is generic over `B: Backend`; a [`BackendJob`] is run once, monomorphised for the
//! backend the user picked.

use std::fmt;

use prefer_kernels::PreferBackend;

/// A backend the user can ask for (`backend`; serialised by its `--backend` name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// CPU through ndarray.
    Ndarray,
    /// CPU through burn-flex (SIMD kernels, multi-threaded; f16/bf16 tensors): the default.
    Flex,
    /// GPU through wgpu: Vulkan, Metal or DirectX (WGSL kernels).
    Wgpu,
    /// NVIDIA GPU through CUDA.
    Cuda,
}

impl BackendKind {
    /// All kinds, in preference order for `--backend` help.
    pub const ALL: [BackendKind; 4] = [Self::Ndarray, Self::Flex, Self::Wgpu, Self::Cuda];

    /// The cargo feature and `--backend` value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ndarray => "ndarray",
            Self::Flex => "flex",
            Self::Wgpu => "wgpu",
            Self::Cuda => "cuda",
        }
    }

    /// Whether the backend runs on the CPU.
    pub fn is_cpu(self) -> bool {
        matches!(self, Self::Ndarray | Self::Flex)
    }

    /// Whether this binary was built with the backend.
    pub fn compiled_in(self) -> bool {
        match self {
            Self::Ndarray => cfg!(feature = "ndarray"),
            Self::Flex => cfg!(feature = "flex"),
            Self::Wgpu => cfg!(feature = "wgpu"),
            Self::Cuda => cfg!(feature = "cuda"),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s.to_ascii_lowercase())
            .ok_or_else(|| format!("unknown backend `{s}` (expected ndarray, flex, wgpu or cuda)"))
    }
}

/// Why a backend cannot run.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The binary was built without the backend's cargo feature.
    #[error("backend `{0}` is not compiled into this binary; rebuild with `--features {0}`")]
    NotCompiled(BackendKind),
    /// The backend is compiled in but found no usable device.
    #[error("backend `{0}` found no device: {1}")]
    NoDevice(BackendKind, String),
}

/// Work to run on whichever backend is chosen.
pub trait BackendJob {
    /// What the job returns.
    type Output;
    /// Runs on backend `B` and its device.
    fn run<B: PreferBackend>(self, device: B::Device) -> Self::Output;
}

/// Runs `job` on the backend `kind`, after checking that it is compiled in and has a device.
pub fn run_on<J: BackendJob>(kind: BackendKind, job: J) -> Result<J::Output, BackendError> {
    if !kind.compiled_in() {
        return Err(BackendError::NotCompiled(kind));
    }
    match kind {
        #[cfg(feature = "ndarray")]
        BackendKind::Ndarray => Ok(job.run::<burn::backend::NdArray>(Default::default())),
        #[cfg(feature = "flex")]
        BackendKind::Flex => Ok(job.run::<burn::backend::Flex>(Default::default())),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => {
            probe::<burn::backend::Wgpu>(kind, &Default::default())?;
            Ok(job.run::<burn::backend::Wgpu>(Default::default()))
        }
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => {
            let device = burn::backend::cuda::CudaDevice::new(0);
            probe::<burn::backend::Cuda>(kind, &device)?;
            Ok(job.run::<burn::backend::Cuda>(device))
        }
        #[allow(unreachable_patterns)]
        _ => Err(BackendError::NotCompiled(kind)),
    }
}

/// Whether a backend has a usable device ([`prefer_kernels::device_probe::probe`]).
#[allow(dead_code)]
fn probe<B: burn::tensor::backend::Backend>(
    kind: BackendKind,
    device: &B::Device,
) -> Result<(), BackendError> {
    prefer_kernels::device_probe::probe::<B>(device)
        .map_err(|message| BackendError::NoDevice(kind, message))
}

pub use prefer_kernels::device_probe::{wgpu_available, wgpu_ready};
