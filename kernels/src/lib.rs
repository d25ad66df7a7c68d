//! Backend extensions for prefer: operations with a CubeCL kernel on the GPU backends (wgpu, CUDA)
//! and a plain tensor-op implementation everywhere else. Callers use one function; the backend picks.
//!
//! Each extension is a trait over `Backend` implemented for the CPU backend (tensor ops), for
//! `CubeBackend` (the kernel), for `Fusion<B>` (a custom operation wrapping the kernel) and for
//! `Autodiff<B>`. This crate knows tensors, not models.
#![warn(missing_docs)]

pub mod attention;
#[cfg(feature = "flex")]
mod cpu;
#[cfg(feature = "cube")]
mod cube_grid;
pub mod device_probe;
pub mod dpo_loss;
pub mod frozen_matmul;
#[cfg(feature = "cube")]
mod fusion_op;
pub mod lm_head;
pub mod lora;
pub mod nf4_dequant;
pub mod rms_norm;
pub mod rope;
pub mod selective_log_softmax;
pub mod seq_layout;
pub mod swiglu;
#[cfg(feature = "flex")]
mod vector_exp;

pub use attention::{AttentionBackend, HeadShape, varlen_attention};
pub use dpo_loss::{DpoLossBackend, DpoLossOutput, dpo_sigmoid_loss};
pub use frozen_matmul::{FrozenMatmulBackend, frozen_matmul};
pub use lm_head::{
    DEFAULT_CHUNK, FusedLmHeadBackend, HeadWithRowGrads, LmHeadOutput, fused_lm_head,
};
pub use lora::{LoraBackend, LoraGrads, lora_update};
pub use nf4_dequant::{Nf4DequantBackend, nf4_dequantize};
pub use rms_norm::{RmsNormBackend, rms_norm};
pub use rope::{RopeBackend, rope};
pub use selective_log_softmax::{SelectiveLogSoftmaxBackend, selective_log_softmax};
pub use seq_layout::SeqLayout;
pub use swiglu::{SwiGluBackend, swiglu};

/// The operations of a decoder layer: what the model puts on its backend.
pub trait LayerBackend:
    AttentionBackend + FrozenMatmulBackend + RmsNormBackend + RopeBackend + SwiGluBackend
{
}

impl<B> LayerBackend for B where
    B: AttentionBackend + FrozenMatmulBackend + RmsNormBackend + RopeBackend + SwiGluBackend
{
}

/// Every extension prefer needs: the bound training code puts on its backend.
pub trait PreferBackend:
    LayerBackend
    + LoraBackend
    + Nf4DequantBackend
    + SelectiveLogSoftmaxBackend
    + FusedLmHeadBackend
    + DpoLossBackend
{
}

impl<B> PreferBackend for B where
    B: LayerBackend
        + LoraBackend
        + Nf4DequantBackend
        + SelectiveLogSoftmaxBackend
        + FusedLmHeadBackend
        + DpoLossBackend
{
}
