//! Layer-level activation checkpointing: during the forward pass each decoder layer keeps only its
//! input; its activations are recomputed when the gradients reach it, so the memory of a training
//! step grows with one layer's activations plus every layer's input, not with all layers'
//! activations.
//!
//! Burn records one graph per connected computation and cannot run a backward pass inside
//! another one, so a layer is not wrapped in a custom autodiff op. Instead the forward pass runs
//! the layers with untracked parameters (Burn records nothing for an op none of whose inputs
//! need a gradient) and hands the last layer's output to the layers above as a leaf. After the
//! loss's own backward pass, [`LlamaModel::backward`](crate::LlamaModel::backward) walks the layers
//! from the top: it reruns each one with a graph from its saved input and back-propagates the
//! gradient that reached its output through that layer alone.
//!
//! Dropout draws masks from the backend's generator; a layer that draws any (LoRA dropout) is
//! run under a seed of its own, set again before its recomputation, so both passes draw the same
//! masks and the gradients are those of the loss that was computed.

use std::{
    any::Any,
    fmt,
    sync::{Arc, Mutex, PoisonError},
};

use burn::{
    module::{Module, ModuleVisitor, Param},
    tensor::{
        Distribution, Tensor,
        backend::{AutodiffBackend, Backend},
    },
};
use prefer_kernels::{LayerBackend, SeqLayout};

use crate::{linear::LinearLayer, model::DecoderLayer, rope::RopeTables};

/// The inputs saved by checkpointed forward passes until [`LlamaModel::backward`] consumes them;
/// shared by the clones of a model (they run one after the other on the training thread).
///
/// [`LlamaModel::backward`]: crate::LlamaModel::backward
#[derive(Clone, Default)]
pub struct ActivationCheckpoints {
    // Type-erased so that the model's field does not depend on the backend: the inner-backend
    // twin of a model shares it and never records into it (it has no graph to save memory from).
    saved: Arc<Mutex<Vec<Box<dyn Any + Send>>>>,
}

impl fmt::Debug for ActivationCheckpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ActivationCheckpoints({} pending)", self.lock().len())
    }
}

/// One checkpointed pass through the decoder layers.
struct Segment<B: Backend> {
    /// Each layer's input, untracked.
    inputs: Vec<Tensor<B, 3>>,
    /// The last layer's output as the leaf the layers above were computed from.
    output: Tensor<B, 3>,
    rope: RopeTables<B>,
    layout: SeqLayout,
    /// Base of the per-layer dropout seeds, when a layer draws masks.
    seed: Option<u64>,
}

impl ActivationCheckpoints {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Box<dyn Any + Send>>> {
        self.saved.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `layers` on `x` keeping only each layer's input; returns the last output as a leaf.
    ///
    /// # Panics
    /// If a layer draws dropout masks and the seed drawn for it cannot be read from the device.
    pub(crate) fn forward<B: LayerBackend, L: LinearLayer<B>>(
        &self,
        layers: &[DecoderLayer<B, L>],
        x: Tensor<B, 3>,
        rope: RopeTables<B>,
        layout: &SeqLayout,
    ) -> Tensor<B, 3> {
        let device = x.device();
        let seed = layers
            .iter()
            .any(DecoderLayer::draws_randomness)
            .then(|| draw_seed::<B>(&device));
        let mut inputs = Vec::with_capacity(layers.len());
        let mut x = x.detach();
        for (i, layer) in layers.iter().enumerate() {
            inputs.push(x.clone());
            if let Some(seed) = seed {
                B::seed(&device, layer_seed(seed, i));
            }
            // Untracked parameters and input: Burn records no graph and keeps no activation.
            x = layer.clone().no_grad().forward(x, &rope, layout);
        }
        let output = x.detach().require_grad();
        self.lock().push(Box::new(Segment {
            inputs,
            output: output.clone(),
            rope,
            layout: layout.clone(),
            seed,
        }));
        output
    }

    /// Back-propagates through the layers of every pending segment, newest first, adding the
    /// layers' parameter gradients to `grads` (which holds the gradients of the segments' outputs).
    pub(crate) fn backward<B: LayerBackend + AutodiffBackend, L: LinearLayer<B>>(
        &self,
        layers: &[DecoderLayer<B, L>],
        grads: &mut B::Gradients,
    ) {
        let pending = std::mem::take(&mut *self.lock());
        for segment in pending.into_iter().rev() {
            // A segment of another backend type cannot come from this model's forward pass.
            if let Ok(segment) = segment.downcast::<Segment<B>>() {
                segment.backward(layers, grads);
            }
        }
    }
}

impl<B: LayerBackend + AutodiffBackend> Segment<B> {
    fn backward<L: LinearLayer<B>>(self, layers: &[DecoderLayer<B, L>], grads: &mut B::Gradients) {
        let Some(mut grad) = self.output.grad_remove(grads) else {
            return; // the loss does not depend on these layers
        };
        let device = self.output.device();
        for (i, (layer, input)) in layers.iter().zip(self.inputs).enumerate().rev() {
            if let Some(seed) = self.seed {
                B::seed(&device, layer_seed(seed, i));
            }
            // The bottom layer's input comes from the frozen embedding: no gradient needed there.
            let input = if i > 0 {
                input.detach().require_grad()
            } else {
                input.detach()
            };
            let output = layer.forward(input.clone(), &self.rope, &self.layout);
            // The gradient of ⟨output, grad⟩ is the vector–Jacobian product of the layer.
            let layer_grads = (output * Tensor::from_inner(grad.clone())).sum().backward();
            layer.visit(&mut AddGrads {
                from: &layer_grads,
                into: grads,
            });
            match input.grad(&layer_grads) {
                Some(g) if i > 0 => grad = g,
                _ => break,
            }
        }
    }
}

/// Adds each parameter's gradient in `from` to its entry in `into`.
struct AddGrads<'a, B: AutodiffBackend> {
    from: &'a B::Gradients,
    into: &'a mut B::Gradients,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for AddGrads<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let tensor = param.val();
        if let Some(g) = tensor.grad(self.from) {
            let sum = match tensor.grad(self.into) {
                Some(previous) => previous + g,
                None => g,
            };
            tensor.grad_replace(self.into, sum);
        }
    }
}

/// A seed from the backend's generator, so that a run seeded per step (the trainer's) draws the
/// same masks again when it resumes.
fn draw_seed<B: Backend>(device: &B::Device) -> u64 {
    let draws = Tensor::<B, 1>::random([2], Distribution::Default, device);
    let draws: Vec<f32> = crate::host::read(draws, "the dropout seed of a checkpointed forward")
        .unwrap_or_else(|e| panic!("activation checkpointing: {e}"));
    draws
        .iter()
        .fold(0u64, |acc, d| (acc << 32) | u64::from(d.to_bits()))
}

/// Layer `i`'s seed under `seed` (SplitMix64's finaliser, so neighbouring layers differ widely).
fn layer_seed(seed: u64, i: usize) -> u64 {
    let mut z = seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
