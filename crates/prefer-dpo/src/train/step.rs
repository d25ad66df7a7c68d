//! One DPO step as burn-train's `TrainStep` / `InferenceStep`: the policy's log-probs, the
//! reference's (a frozen adapter over the same base, or precomputed), the loss and its gradients,
//! and the per-pair numbers the metrics need — read on the training thread.

use burn::{
    module::Module,
    tensor::{Tensor, backend::Backend},
    train::{InferenceStep, ItemLazy, TrainOutput, TrainStep},
};
use prefer_kernels::PreferBackend;
use prefer_llama::{LinearLayer, LlamaModel};
use prefer_lora::{LoraLinear, set_active_adapter};

use super::bounds::{BaseLayer, TrainBackend};
use crate::{
    data::DpoBatch,
    eval::{BatchEval, KlValues, evaluate_batch_with, evaluate_kto, evaluate_reference_free},
    host::{DeviceReadError, read},
    logps::sequence_logps,
    loss::{LossConfig, Method},
    metrics::PairRecords,
};

/// The model a DPO run trains: a Llama whose projections carry LoRA adapters over a frozen base.
///
/// `policy` is the trainable adapter; the reference is the frozen adapter `reference` over the same
/// base (or the bare base with `None`), unless the batch brings precomputed reference log-probs.
#[derive(Module, Debug)]
pub struct DpoPolicy<B: Backend, L> {
    /// The model; only the `policy` adapter's factors are trainable.
    pub model: LlamaModel<B, LoraLinear<B, L>>,
    /// Loss options.
    #[module(skip)]
    pub loss: LossConfig,
    /// The frozen adapter the reference runs with (`None`: adapters off).
    #[module(skip)]
    pub reference: Option<String>,
}

/// A step's input: a batch and, when precomputed, the reference's per-row log-prob sums.
#[derive(Debug, Clone)]
pub struct DpoInput<B: Backend> {
    /// `[chosen.., rejected..]` rows; KTO's examples' completions when `kl_batch` is given.
    pub batch: DpoBatch<B>,
    /// KTO: the examples' KL completions, run apart from `batch` (`None` for pairs, or for KTO
    /// examples batched as `[completions.., KL completions..]`).
    pub kl_batch: Option<DpoBatch<B>>,
    /// Reference sums `[2P]` in `[chosen.., rejected..]` (KTO: `[completions.., KL..]`) order, or
    /// `None` to run the reference model.
    pub ref_logps: Option<Tensor<B, 1>>,
}

impl<B: Backend> DpoInput<B> {
    /// The reference's sums `[2P]` under `reference`, over the batch and, for KTO, its KL rows.
    fn reference_sums<L: LinearLayer<B>>(
        &self,
        reference: &LlamaModel<B, LoraLinear<B, L>>,
        ld_alpha: Option<f64>,
    ) -> Tensor<B, 1>
    where
        B: PreferBackend,
        LoraLinear<B, L>: LinearLayer<B>,
    {
        let sums = sequence_logps(reference, &self.batch).logps(ld_alpha);
        match &self.kl_batch {
            Some(kl) => Tensor::cat(vec![sums, sequence_logps(reference, kl).logps(ld_alpha)], 0),
            None => sums,
        }
    }
}

/// A step's numbers on the host: the loss and the per-pair values behind TRL's metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DpoOutput {
    /// The (weighted) loss of the micro-batch.
    pub loss: f64,
    /// Per-pair log-probs and token counts.
    pub records: PairRecords,
    /// Tokens in the micro-batch (prompt + completion, padding excluded).
    pub tokens: usize,
    /// Tokens the model computed (padding included when the batch is padded).
    pub computed_tokens: usize,
}

impl ItemLazy for DpoOutput {
    type ItemSync = DpoOutput;
    fn sync(self) -> Self::ItemSync {
        self
    }
}

impl<B: PreferBackend, L: LinearLayer<B>> DpoPolicy<B, L>
where
    LoraLinear<B, L>: LinearLayer<B>,
{
    /// The loss of `input` with its per-pair values.
    pub fn evaluate(&self, input: &DpoInput<B>) -> BatchEval<B> {
        self.evaluate_with(input, None)
    }

    /// [`DpoPolicy::evaluate`], with KTO's KL values given when already computed (the training
    /// step computes them without an autodiff graph).
    fn evaluate_with(&self, input: &DpoInput<B>, kl: Option<KlValues<B>>) -> BatchEval<B> {
        if !self.loss.method.uses_reference() {
            return evaluate_reference_free(&self.loss, &self.model, &input.batch);
        }
        let ref_sums = match &input.ref_logps {
            Some(r) => r.clone(),
            None => {
                // Same base, other adapter: a clone shares every tensor.
                let mut reference = self.model.clone();
                set_active_adapter(&mut reference, self.reference.as_deref());
                // The reference is a fixed function: no adapter dropout.
                for (_, layer) in reference.projections_mut() {
                    layer.dropout.prob = 0.0;
                }
                input
                    .reference_sums(&reference, self.loss.ld_alpha)
                    .detach()
            }
        };
        if self.loss.method == Method::Kto {
            let kl = kl.or_else(|| {
                let kl_batch = input.kl_batch.as_ref()?;
                Some(KlValues::of(sequence_logps(&self.model, kl_batch)))
            });
            return evaluate_kto(&self.loss, &self.model, ref_sums, &input.batch, kl);
        }
        evaluate_batch_with(&self.loss, &self.model, ref_sums, &input.batch)
    }

    /// One evaluation step ([`InferenceStep`]'s), with a failed device read as an error.
    pub fn infer(&self, input: DpoInput<B>) -> Result<DpoOutput, DeviceReadError> {
        let eval = self.evaluate(&input);
        self.output(&input, &eval)
    }

    fn output(
        &self,
        input: &DpoInput<B>,
        eval: &BatchEval<B>,
    ) -> Result<DpoOutput, DeviceReadError> {
        let loss: Vec<f64> = read(eval.loss.clone(), "the loss")?;
        Ok(DpoOutput {
            loss: loss.first().copied().unwrap_or(f64::NAN),
            records: eval.records()?,
            tokens: input.batch.tokens + input.kl_batch.as_ref().map_or(0, |k| k.tokens),
            computed_tokens: input.batch.computed_tokens
                + input.kl_batch.as_ref().map_or(0, |k| k.computed_tokens),
        })
    }
}

impl<B: TrainBackend, L: BaseLayer<B>> DpoPolicy<B, L> {
    /// One training step ([`TrainStep`]'s): the loss, its gradients and the step's numbers, with a
    /// failed device read as an error.
    pub fn train_step(
        &self,
        mut input: DpoInput<B>,
    ) -> Result<TrainOutput<DpoOutput>, DeviceReadError> {
        // The reference and KTO's KL completions run on the inner backend: no autodiff graph,
        // nothing kept for the backward pass, so they cost one forward's transient memory.
        let needs_reference = input.ref_logps.is_none() && self.loss.method.uses_reference();
        let mut kl = None;
        if needs_reference || input.kl_batch.is_some() {
            let inner_model = burn::module::AutodiffModule::valid(&self.model);
            let inner = DpoInput {
                batch: input.batch.inner(),
                kl_batch: input.kl_batch.as_ref().map(DpoBatch::inner),
                ref_logps: None,
            };
            if needs_reference {
                let mut reference = inner_model.clone();
                set_active_adapter(&mut reference, self.reference.as_deref());
                let sums = inner.reference_sums(&reference, self.loss.ld_alpha);
                input.ref_logps = Some(Tensor::from_inner(sums));
            }
            kl = inner
                .kl_batch
                .as_ref()
                .map(|kl| KlValues::of(sequence_logps(&inner_model, kl)).map(Tensor::from_inner));
        }
        // Burn 0.21's autodiff graphs are not safe to build on one thread while another thread
        // builds or back-propagates its own (data-parallel replicas computed different gradients
        // now and then): the graph work of a step holds the process's graph lock.
        let graph = autodiff_graph_lock();
        let eval = self.evaluate_with(&input, kl);
        // Through the model: with activation checkpointing, its layers' gradients come after
        // the loss's own backward pass.
        let grads = self.model.backward(eval.loss.clone());
        drop(graph);
        let out = self.output(&input, &eval)?;
        Ok(TrainOutput::new(self, grads, out))
    }
}

/// The lock a training step holds while it builds and back-propagates its autodiff graph.
fn autodiff_graph_lock() -> std::sync::MutexGuard<'static, ()> {
    static GRAPH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    GRAPH
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<B: TrainBackend, L: BaseLayer<B>> TrainStep for DpoPolicy<B, L> {
    type Input = DpoInput<B>;
    type Output = DpoOutput;

    /// burn-train's trait cannot return an error: a failed device read stops with its message
    /// (prefer's own loop calls [`DpoPolicy::train_step`] and returns it).
    fn step(&self, input: DpoInput<B>) -> TrainOutput<DpoOutput> {
        self.train_step(input).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl<B, L> InferenceStep for DpoPolicy<B, L>
where
    B: PreferBackend,
    L: LinearLayer<B>,
    LoraLinear<B, L>: LinearLayer<B>,
{
    type Input = DpoInput<B>;
    type Output = DpoOutput;

    /// burn-train's trait cannot return an error: a failed device read stops with its message
    /// (prefer's own loop calls [`DpoPolicy::infer`] and returns it).
    fn step(&self, input: DpoInput<B>) -> DpoOutput {
        self.infer(input).unwrap_or_else(|e| panic!("{e}"))
    }
}
