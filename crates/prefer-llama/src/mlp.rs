//! The SwiGLU feed-forward block: `down(silu(gate(x)) · up(x))`.

use burn::{
    module::Module,
    tensor::{Tensor, backend::Backend},
};
use prefer_kernels::{SwiGluBackend, swiglu};

use crate::linear::LinearLayer;

/// Llama's gated MLP.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend, L> {
    /// The SiLU-gated branch.
    pub gate_proj: L,
    /// The linear branch.
    pub up_proj: L,
    /// Back to the residual width.
    pub down_proj: L,
    _backend: core::marker::PhantomData<B>,
}

impl<B: Backend, L: LinearLayer<B>> Mlp<B, L> {
    /// Assembles the block from its projections.
    pub fn new(gate_proj: L, up_proj: L, down_proj: L) -> Self {
        Self {
            gate_proj,
            up_proj,
            down_proj,
            _backend: Default::default(),
        }
    }

    /// `[batch, len, hidden] -> [batch, len, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3>
    where
        B: SwiGluBackend,
    {
        let gated = swiglu(self.gate_proj.forward(x.clone()), self.up_proj.forward(x));
        self.down_proj.forward(gated)
    }
}
