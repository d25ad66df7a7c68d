//! What training asks of its backend and of the frozen base layers, said once: the trainer, the
//! step and the façade name these two traits instead of repeating the bounds.

use burn::{module::AutodiffModule, tensor::backend::AutodiffBackend};
use prefer_kernels::PreferBackend;
use prefer_llama::LinearLayer;

/// A backend DPO trains on: autodiff over a backend with prefer's kernels, whose inner backend —
/// where the reference and evaluation run, without a graph — has them too.
pub trait TrainBackend: AutodiffBackend<InnerBackend: PreferBackend> + PreferBackend {}

impl<B> TrainBackend for B
where
    B: AutodiffBackend + PreferBackend,
    B::InnerBackend: PreferBackend,
{
}

/// A frozen base projection (dense or NF4) that training puts LoRA adapters on: a layer on `B`
/// whose inner-backend twin is a layer too.
pub trait BaseLayer<B: TrainBackend>:
    LinearLayer<B> + AutodiffModule<B, InnerModule: LinearLayer<B::InnerBackend>> + 'static
{
}

impl<B, L> BaseLayer<B> for L
where
    B: TrainBackend,
    L: LinearLayer<B> + AutodiffModule<B> + 'static,
    L::InnerModule: LinearLayer<B::InnerBackend>,
{
}
