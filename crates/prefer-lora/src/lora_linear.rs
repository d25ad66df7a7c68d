//! A linear layer with low-rank adapters: `base(x) + dropout(x)·A·B·scale`, the merged weight never
//! built while training; with DoRA, each output row is rescaled to a trained magnitude
//! ([`crate::dora`]). Several named adapters can sit over one base (a trainable policy and a
//! frozen reference snapshot), and any one — or none — is active.

use burn::{
    module::{Module, Param, ParamId},
    nn::{Dropout, DropoutConfig},
    tensor::{Distribution, Tensor, backend::Backend},
};
use prefer_kernels::{LoraBackend, lora_update};
use prefer_llama::{
    HostTensor, LinearFactory, LinearLayer, LinearSpec, Result, WeightSource, cast_to,
};

use crate::{
    config::LoraConfig,
    dora::{DoraMagnitude, dora_forward, merge_rows},
};

/// One adapter's factors.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// Down-projection, stored `[in, r]` (PEFT stores `lora_A.weight` as `[r, in]`).
    pub a: Param<Tensor<B, 2>>,
    /// Up-projection, stored `[r, out]` (PEFT stores `lora_B.weight` as `[out, r]`).
    pub b: Param<Tensor<B, 2>>,
    /// `lora_alpha / r` (or `/ √r`).
    pub scaling: f64,
    /// DoRA's magnitude per output row (`use_dora`); `None` for plain LoRA.
    pub dora: Option<DoraMagnitude<B>>,
}

impl<B: Backend> LoraAdapter<B> {
    /// PEFT's initialisation: A Kaiming-uniform with a = √5 (U(±1/√in)), B zeros, so a fresh
    /// adapter leaves the layer unchanged. Both factors are trainable.
    pub fn init(d_in: usize, d_out: usize, config: &LoraConfig, device: &B::Device) -> Self {
        let bound = 1.0 / (d_in as f64).sqrt();
        Self {
            a: Param::from_tensor(Tensor::random(
                [d_in, config.r],
                Distribution::Uniform(-bound, bound),
                device,
            )),
            b: Param::from_tensor(Tensor::zeros([config.r, d_out], device)),
            scaling: config.scaling(),
            dora: None,
        }
    }

    /// Adds DoRA's magnitude, initialised as PEFT does to the adapted weight's row norms (so the
    /// layer's output does not change).
    pub fn with_dora<L: LinearLayer<B>>(mut self, base: &L) -> Self {
        self.dora = Some(DoraMagnitude::init(
            base,
            self.a.val(),
            self.b.val(),
            self.scaling,
        ));
        self
    }

    /// From PEFT's tensors `lora_A.weight` `[r, in]` and `lora_B.weight` `[out, r]`; trainable.
    pub fn from_peft(a: &HostTensor, b: &HostTensor, scaling: f64, device: &B::Device) -> Self {
        Self {
            a: Param::from_tensor(a.transposed().to_tensor(device)),
            b: Param::from_tensor(b.transposed().to_tensor(device)),
            scaling,
            dora: None,
        }
    }

    /// A frozen copy that shares the tensors (no memory until the original is updated).
    pub fn frozen_copy(&self) -> Self {
        Self {
            a: Param::initialized(ParamId::new(), self.a.val().detach()),
            b: Param::initialized(ParamId::new(), self.b.val().detach()),
            scaling: self.scaling,
            dora: self.dora.as_ref().map(DoraMagnitude::frozen_copy),
        }
    }

    /// A frozen adapter `α·towards + (1 − α)·self`, factor by factor (the rule TRL's
    /// `SyncRefModelCallback` applies to every parameter of a reference model); it keeps this
    /// adapter's parameter ids.
    pub fn mixed_towards(&self, towards: &Self, alpha: f64) -> Self {
        let mix = |own: &Param<Tensor<B, 2>>, other: &Param<Tensor<B, 2>>| {
            let value = other.val().detach() * alpha + own.val().detach() * (1.0 - alpha);
            Param::initialized(own.id, value.detach())
        };
        Self {
            a: mix(&self.a, &towards.a),
            b: mix(&self.b, &towards.b),
            scaling: self.scaling,
            dora: match (&self.dora, &towards.dora) {
                (Some(own), Some(other)) => Some(own.mixed_towards(other, alpha)),
                (own, _) => own.as_ref().map(DoraMagnitude::frozen_copy),
            },
        }
    }

    /// `scale · (A·B)ᵀ`, `[out, in]`.
    pub fn delta(&self) -> Tensor<B, 2> {
        self.a.val().matmul(self.b.val()).transpose() * self.scaling
    }
}

/// A base layer with named adapters, at most one active.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend, L> {
    /// The frozen base (dense or NF4).
    pub base: L,
    /// The adapters, in the order of `names`.
    pub adapters: Vec<LoraAdapter<B>>,
    /// Dropout on the adapter input (only active while training under autodiff).
    pub dropout: Dropout,
    /// Adapter names.
    #[module(skip)]
    pub names: Vec<String>,
    /// Index of the active adapter.
    #[module(skip)]
    pub active: Option<usize>,
}

impl<B: Backend, L: LinearLayer<B>> LoraLinear<B, L> {
    /// A layer with no adapter.
    pub fn bare(base: L, dropout: f64) -> Self {
        Self {
            base,
            adapters: Vec::new(),
            dropout: DropoutConfig::new(dropout).init(),
            names: Vec::new(),
            active: None,
        }
    }

    /// Adds (or replaces) an adapter and makes it active.
    pub fn insert(&mut self, name: &str, adapter: LoraAdapter<B>) {
        match self.names.iter().position(|n| n == name) {
            Some(i) => {
                self.adapters[i] = adapter;
                self.active = Some(i);
            }
            None => {
                self.names.push(name.to_owned());
                self.adapters.push(adapter);
                self.active = Some(self.adapters.len() - 1);
            }
        }
    }

    /// Activates `name`, or no adapter with `None`; false if this layer has no such adapter
    /// (then no adapter is active).
    pub fn set_active(&mut self, name: Option<&str>) -> bool {
        self.active = name.and_then(|n| self.names.iter().position(|x| x == n));
        name.is_none() || self.active.is_some()
    }

    /// The adapter with this name.
    pub fn adapter(&self, name: &str) -> Option<&LoraAdapter<B>> {
        self.names
            .iter()
            .position(|n| n == name)
            .map(|i| &self.adapters[i])
    }
}

impl<B: LoraBackend, L: LinearLayer<B>> LinearLayer<B> for LoraLinear<B, L> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let y = self.base.forward(x.clone());
        match self.active {
            Some(i) => {
                let ad = &self.adapters[i];
                let factors = (ad.a.val(), ad.b.val(), ad.scaling);
                match &ad.dora {
                    Some(dora) => dora_forward(&self.base, y, x, &self.dropout, factors, dora),
                    None => {
                        // f32 factors meet half-precision activations in their type; the
                        // cast's backward returns their gradients in f32.
                        let dtype = x.dtype();
                        let (a, b) = (cast_to(factors.0, dtype), cast_to(factors.1, dtype));
                        lora_update(y, self.dropout.forward(x), a, b, factors.2)
                    }
                }
            }
            None => y,
        }
    }

    fn merged_weight(&self) -> Tensor<B, 2> {
        let w = self.base.merged_weight();
        match self.active.map(|i| &self.adapters[i]) {
            Some(ad) => match &ad.dora {
                Some(dora) => merge_rows(w + ad.delta(), dora.magnitude.val()),
                None => w + ad.delta(),
            },
            None => w,
        }
    }

    fn bias(&self) -> Option<Tensor<B, 1>> {
        self.base.bias()
    }

    fn draws_randomness(&self) -> bool {
        (self.active.is_some() && self.dropout.prob > 0.0) || self.base.draws_randomness()
    }

    fn dims(&self) -> [usize; 2] {
        self.base.dims()
    }
}

/// Builds base layers with `inner` and wraps them, giving the targeted projections a fresh adapter.
#[derive(Debug, Clone)]
pub struct LoraFactory<F> {
    /// Builds the base layers.
    pub inner: F,
    /// The adapter to create.
    pub config: LoraConfig,
    /// The new adapter's name.
    pub adapter_name: String,
}

impl<F> LoraFactory<F> {
    /// Wraps every base layer without creating an adapter: a model that adapters are loaded into
    /// afterwards (`load_peft`), or that runs as the bare base.
    pub fn without_adapters(inner: F) -> Self {
        Self {
            inner,
            config: LoraConfig {
                target_modules: vec![],
                ..Default::default()
            },
            adapter_name: String::new(),
        }
    }
}

impl<B: LoraBackend, F: LinearFactory<B>> LinearFactory<B> for LoraFactory<F> {
    type Layer = LoraLinear<B, F::Layer>;

    fn build(
        &self,
        spec: &LinearSpec,
        source: &mut dyn WeightSource,
        device: &B::Device,
    ) -> Result<Self::Layer> {
        let (d_out, d_in) = (spec.out_features, spec.in_features);
        let site = spec.site;
        let mut layer = LoraLinear::bare(
            self.inner.build(spec, source, device)?,
            self.config.lora_dropout,
        );
        if self.config.target_modules.contains(&site.projection) {
            let adapter = LoraAdapter::init(d_in, d_out, &self.config, device);
            let adapter = if self.config.use_dora {
                adapter.with_dora(&layer.base)
            } else {
                adapter
            };
            layer.insert(&self.adapter_name, adapter);
        }
        Ok(layer)
    }
}
