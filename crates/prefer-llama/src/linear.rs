//! The linear projections of the decoder. The model is generic over the layer type so that
//! other crates can put NF4-quantised or LoRA-adapted layers in the same places.

use burn::{
    module::{Module, Param, ParamId},
    tensor::{DType, FloatDType, Tensor, backend::Backend},
};

use prefer_kernels::{FrozenMatmulBackend, frozen_matmul};

use crate::{
    error::Result,
    weights::{HostTensor, WeightSource, fetch},
};

/// Which projection of which layer a linear sits in (PEFT's `target_modules` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinearSite {
    /// Decoder layer index.
    pub layer: usize,
    /// Projection within the layer.
    pub projection: Projection,
}

/// The seven projections of a Llama decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Projection {
    /// Query.
    Q,
    /// Key.
    K,
    /// Value.
    V,
    /// Attention output.
    O,
    /// MLP gate (the SiLU branch).
    Gate,
    /// MLP up.
    Up,
    /// MLP down.
    Down,
}

impl Projection {
    /// All seven, in checkpoint order.
    pub const ALL: [Projection; 7] = [
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];

    /// The module name used by Hugging Face and PEFT (`q_proj`, ...).
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }

    /// `self_attn` or `mlp`.
    pub fn hf_parent(self) -> &'static str {
        match self {
            Self::Q | Self::K | Self::V | Self::O => "self_attn",
            _ => "mlp",
        }
    }
}

impl LinearSite {
    /// The Hugging Face module path, e.g. `model.layers.3.self_attn.q_proj`.
    pub fn hf_path(&self) -> String {
        format!(
            "model.layers.{}.{}.{}",
            self.layer,
            self.projection.hf_parent(),
            self.projection.hf_name()
        )
    }
}

/// `t` in the floating type `dtype` (no copy when it already is): the compute type follows the
/// activations, so that weights kept in f32 (LoRA factors, norms) meet them in half precision.
pub fn cast_to<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(FloatDType::from(dtype))
    }
}

/// A linear map `y = x·Wᵀ + b` over the last dimension.
pub trait LinearLayer<B: Backend>: Module<B> + burn::module::ModuleDisplay {
    /// Applies the map to `[batch, len, in_features]`, computing in `x`'s floating type.
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3>;
    /// The effective weight `[out, in]` in full precision (dequantised, adapters merged), for
    /// exporting a merged checkpoint; not used on the training path.
    fn merged_weight(&self) -> Tensor<B, 2>;
    /// The bias `[out]`, if any.
    fn bias(&self) -> Option<Tensor<B, 1>>;
    /// `[out_features, in_features]`.
    fn dims(&self) -> [usize; 2];
    /// Whether [`Self::forward`] draws from the backend's generator (dropout), so that activation
    /// checkpointing replays its draws when it recomputes the layer.
    fn draws_randomness(&self) -> bool {
        false
    }
}

/// What the model expects of one projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearSpec {
    /// Where it sits.
    pub site: LinearSite,
    /// Rows of the weight.
    pub out_features: usize,
    /// Columns of the weight.
    pub in_features: usize,
    /// Whether the config asks for a bias.
    pub bias: bool,
}

impl LinearSpec {
    /// Reads the full-precision weight `[out, in]` and bias `[out]`, checking their shapes.
    pub fn fetch_dense(
        &self,
        source: &mut dyn WeightSource,
    ) -> Result<(HostTensor, Option<HostTensor>)> {
        let path = self.site.hf_path();
        let weight = fetch(
            source,
            &format!("{path}.weight"),
            &[self.out_features, self.in_features],
        )?;
        let bias = if self.bias {
            Some(fetch(
                source,
                &format!("{path}.bias"),
                &[self.out_features],
            )?)
        } else {
            None
        };
        Ok((weight, bias))
    }
}

/// Builds the projection layers while a checkpoint loads; each factory reads the tensors it needs.
pub trait LinearFactory<B: Backend> {
    /// The layer type the model will hold.
    type Layer: LinearLayer<B>;
    /// Builds one layer from the checkpoint.
    fn build(
        &self,
        spec: &LinearSpec,
        source: &mut dyn WeightSource,
        device: &B::Device,
    ) -> Result<Self::Layer>;
}

/// A full-precision, frozen linear layer.
#[derive(Module, Debug)]
pub struct DenseLinear<B: Backend> {
    /// Weight stored transposed, `[in, out]`, so the forward is a plain matmul.
    pub weight: Param<Tensor<B, 2>>,
    /// Optional bias `[out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> DenseLinear<B> {
    /// A frozen layer from a Hugging Face weight `[out, in]` and bias.
    pub fn from_host(weight: &HostTensor, bias: Option<&HostTensor>, device: &B::Device) -> Self {
        Self {
            weight: Param::initialized(ParamId::new(), weight.transposed().to_tensor(device)),
            bias: bias.map(|b| Param::initialized(ParamId::new(), b.to_tensor(device))),
        }
    }
}

impl<B: FrozenMatmulBackend> LinearLayer<B> for DenseLinear<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let dtype = x.dtype();
        let y = frozen_matmul(x, cast_to(self.weight.val(), dtype));
        match &self.bias {
            Some(b) => y + cast_to(b.val(), dtype).unsqueeze(),
            None => y,
        }
    }

    fn merged_weight(&self) -> Tensor<B, 2> {
        self.weight.val().transpose()
    }

    fn bias(&self) -> Option<Tensor<B, 1>> {
        self.bias.as_ref().map(Param::val)
    }

    fn dims(&self) -> [usize; 2] {
        let [d_in, d_out] = self.weight.dims();
        [d_out, d_in]
    }
}

/// Builds [`DenseLinear`] layers: the full-precision model.
#[derive(Debug, Clone, Copy, Default)]
pub struct DenseFactory;

impl<B: FrozenMatmulBackend> LinearFactory<B> for DenseFactory {
    type Layer = DenseLinear<B>;
    fn build(
        &self,
        spec: &LinearSpec,
        source: &mut dyn WeightSource,
        device: &B::Device,
    ) -> Result<DenseLinear<B>> {
        let (weight, bias) = spec.fetch_dense(source)?;
        Ok(DenseLinear::from_host(&weight, bias.as_ref(), device))
    }
}
