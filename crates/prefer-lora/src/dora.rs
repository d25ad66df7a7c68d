//! DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"; PEFT's `use_dora`): the
//! adapted weight `W + s·ΔW` is split into a direction and a trained magnitude per output row,
//! `W' = m ⊙ (W + s·ΔW) / ‖W + s·ΔW‖_row`. As in PEFT (and the paper's section 4.3) the row norm
//! is a constant for the backward pass, so `m` and the LoRA factors get gradients and the base
//! none.
//!
//! The row norms are found without building `W + s·ΔW`:
//! `‖W_o + s·ΔW_o‖² = ‖W_o‖² + 2s·(W·A)_o·B_o + s²·B_oᵀ(AᵀA)B_o`, where `‖W_o‖²` is computed once
//! (the base is frozen) and `W·A` is the base layer run on the r columns of A, so the same code
//! serves dense and NF4 bases.

use burn::{
    module::{Module, Param, ParamId},
    nn::Dropout,
    tensor::{Tensor, backend::Backend},
};
use prefer_kernels::{LoraBackend, lora_update};
use prefer_llama::{HostTensor, LinearLayer, cast_to};

/// The magnitude of one DoRA-adapted layer.
#[derive(Module, Debug)]
pub struct DoraMagnitude<B: Backend> {
    /// `m` `[out]`, trained (PEFT's `lora_magnitude_vector`).
    pub magnitude: Param<Tensor<B, 1>>,
    /// `‖W_o‖²` of the frozen base's rows `[out]`: a constant.
    pub base_norm_sq: Tensor<B, 1>,
}

impl<B: Backend> DoraMagnitude<B> {
    /// PEFT's initialisation: `m = ‖W + s·ΔW‖_row`, so the layer starts out as plain LoRA.
    pub fn init<L: LinearLayer<B>>(
        base: &L,
        a: Tensor<B, 2>,
        b: Tensor<B, 2>,
        scaling: f64,
    ) -> Self {
        let base_norm_sq = base_norm_sq(base);
        let norms = row_norms(base, &base_norm_sq, a, b, scaling);
        Self {
            magnitude: Param::from_tensor(norms),
            base_norm_sq,
        }
    }

    /// From PEFT's `lora_magnitude_vector` `[out]`; trainable.
    pub fn from_peft<L: LinearLayer<B>>(
        base: &L,
        magnitude: &HostTensor,
        device: &B::Device,
    ) -> Self {
        Self {
            magnitude: Param::from_tensor(magnitude.to_tensor(device)),
            base_norm_sq: base_norm_sq(base),
        }
    }

    /// A frozen copy that shares the tensors.
    pub fn frozen_copy(&self) -> Self {
        Self {
            magnitude: Param::initialized(ParamId::new(), self.magnitude.val().detach()),
            base_norm_sq: self.base_norm_sq.clone(),
        }
    }

    /// A frozen `α·towards + (1 − α)·self`, keeping this magnitude's parameter id.
    pub fn mixed_towards(&self, towards: &Self, alpha: f64) -> Self {
        let value = towards.magnitude.val().detach() * alpha
            + self.magnitude.val().detach() * (1.0 - alpha);
        Self {
            magnitude: Param::initialized(self.magnitude.id, value.detach()),
            base_norm_sq: self.base_norm_sq.clone(),
        }
    }

    /// `m / ‖W + s·ΔW‖_row` `[out]`: differentiable in `m` only.
    pub fn row_scale<L: LinearLayer<B>>(
        &self,
        base: &L,
        a: Tensor<B, 2>,
        b: Tensor<B, 2>,
        scaling: f64,
    ) -> Tensor<B, 1> {
        self.magnitude.val() / row_norms(base, &self.base_norm_sq, a, b, scaling)
    }
}

/// `‖W_o‖²` of every row of a frozen base.
fn base_norm_sq<B: Backend, L: LinearLayer<B>>(base: &L) -> Tensor<B, 1> {
    let w = base.merged_weight().detach();
    let [out, _] = w.dims();
    w.powi_scalar(2).sum_dim(1).reshape([out]).detach()
}

/// `‖W_o + s·ΔW_o‖` of every row (no gradient), with `a` `[in, r]` and `b` `[r, out]` as
/// [`crate::LoraAdapter`] stores them.
fn row_norms<B: Backend, L: LinearLayer<B>>(
    base: &L,
    base_norm_sq: &Tensor<B, 1>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    scaling: f64,
) -> Tensor<B, 1> {
    let (a, b) = (a.detach(), b.detach());
    let [d_in, r] = a.dims();
    let [_, d_out] = b.dims();
    // (W·A)ᵀ `[r, out]`: the base applied to A's columns, its bias taken off again.
    let mut wa = base
        .forward(a.clone().transpose().reshape([1, r, d_in]))
        .reshape([r, d_out]);
    if let Some(bias) = base.bias() {
        wa = wa - bias.reshape([1, d_out]);
    }
    let cross = (wa.detach() * b.clone()).sum_dim(0).reshape([d_out]);
    let gram = a.clone().transpose().matmul(a);
    let quad = (gram.matmul(b.clone()) * b).sum_dim(0).reshape([d_out]);
    let sq = base_norm_sq.clone() + cross * (2.0 * scaling) + quad * (scaling * scaling);
    sq.clamp_min(0.0).sqrt().detach()
}

/// The output of a DoRA layer as PEFT computes it, given the base's output `y` for `x`:
/// `y + (g − 1)·W·x̃ + g·s·x̃·A·B` with `g = m / ‖W + s·ΔW‖_row` and `x̃` the adapter's input after
/// dropout. Without dropout (`x̃ = x`) that is `bias + g·(y − bias + s·x·A·B)`, and the base runs
/// once; with dropout the base runs again on `x̃`.
pub fn dora_forward<B: LoraBackend, L: LinearLayer<B>>(
    base: &L,
    y: Tensor<B, 3>,
    x: Tensor<B, 3>,
    dropout: &Dropout,
    (a, b, scaling): (Tensor<B, 2>, Tensor<B, 2>, f64),
    dora: &DoraMagnitude<B>,
) -> Tensor<B, 3> {
    let [_, _, d_out] = y.dims();
    // The row norms in the factors' f32; the update in the activations' type.
    let dtype = y.dtype();
    let g =
        cast_to(dora.row_scale(base, a.clone(), b.clone(), scaling), dtype).reshape([1, 1, d_out]);
    let (a, b) = (cast_to(a, dtype), cast_to(b, dtype));
    let bias = base
        .bias()
        .map(|bias| cast_to(bias, dtype).reshape([1, 1, d_out]));
    let unbiased = |t: Tensor<B, 3>| match &bias {
        Some(bias) => t - bias.clone(),
        None => t,
    };
    let dropping = dropout.prob > 0.0 && B::ad_enabled(&x.device());
    if dropping {
        let x = dropout.forward(x);
        let wx = unbiased(base.forward(x.clone()));
        y + lora_update(wx.clone(), x, a, b, scaling) * g - wx
    } else {
        let scaled = lora_update(unbiased(y), x, a, b, scaling) * g;
        match bias {
            Some(bias) => scaled + bias,
            None => scaled,
        }
    }
}

/// The merged weight `m ⊙ V / ‖V‖_row` of an adapted weight `V = W + s·ΔW` `[out, in]`.
pub fn merge_rows<B: Backend>(adapted: Tensor<B, 2>, magnitude: Tensor<B, 1>) -> Tensor<B, 2> {
    let [out, _] = adapted.dims();
    let norms = adapted.clone().powi_scalar(2).sum_dim(1).sqrt();
    adapted * (magnitude.reshape([out, 1]) / norms)
}
