//! Gradient averaging and clipping as Hugging Face does them: the accumulated sum is divided by the
//! number of micro-batches, then scaled so that one L2 norm over *all* trainable gradients is at most
//! `max_grad_norm`. (Burn's own clipping takes each tensor's norm on its own.)

use burn::{
    module::{AutodiffModule, ModuleVisitor, Param},
    optim::GradientsParams,
    tensor::{Tensor, backend::AutodiffBackend},
};

/// Scales `grads` of `module` by `1 / micro_batches`, then clips their global norm to `max_norm`
/// (0: no clipping). Returns the global norm after averaging and before clipping (TRL's `grad_norm`).
pub fn average_and_clip<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: GradientsParams,
    micro_batches: usize,
    max_norm: f64,
) -> (GradientsParams, f64) {
    let mut norm = SquaredNorm::<B> {
        sum: None,
        grads: &grads,
    };
    module.visit(&mut norm);
    let scale = 1.0 / micro_batches.max(1) as f64;
    let sum = norm.sum.map_or(0.0, |s| s.into_scalar().elem::<f64>());
    let total = sum.sqrt() * scale;
    let clip = if max_norm > 0.0 && total > max_norm {
        max_norm / (total + 1e-6)
    } else {
        1.0
    };
    let mut scaler = Scale::<B> {
        factor: scale * clip,
        grads,
        _b: std::marker::PhantomData,
    };
    module.visit(&mut scaler);
    (scaler.grads, total)
}

use burn::tensor::ElementConversion;

struct SquaredNorm<'a, B: AutodiffBackend> {
    sum: Option<Tensor<B::InnerBackend, 1>>,
    grads: &'a GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let s = g.powi_scalar(2).sum();
            self.sum = Some(match self.sum.take() {
                Some(acc) => acc + s,
                None => s,
            });
        }
    }
}

struct Scale<B: AutodiffBackend> {
    factor: f64,
    grads: GradientsParams,
    _b: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.factor != 1.0
            && let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id)
        {
            self.grads.register(param.id, g * self.factor);
        }
    }
}
