//! Grouped-query self-attention with rotary positions and an optional key/value cache.

use burn::{
    module::Module,
    tensor::{Tensor, activation::softmax, backend::Backend},
};

use crate::{
    kv_cache::LayerCache,
    linear::LinearLayer,
    rope::{RopeTables, apply_rotary},
};

/// Multi-head attention where groups of `n_rep` query heads share one key/value head.
#[derive(Module, Debug)]
pub struct Attention<B: Backend, L> {
    /// Query projection `[hidden] -> [heads · head_dim]`.
    pub q_proj: L,
    /// Key projection `[hidden] -> [kv_heads · head_dim]`.
    pub k_proj: L,
    /// Value projection `[hidden] -> [kv_heads · head_dim]`.
    pub v_proj: L,
    /// Output projection `[heads · head_dim] -> [hidden]`.
    pub o_proj: L,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    _backend: core::marker::PhantomData<B>,
}

impl<B: Backend, L: LinearLayer<B>> Attention<B, L> {
    /// Assembles the block from its four projections.
    pub fn new(
        q_proj: L,
        k_proj: L,
        v_proj: L,
        o_proj: L,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        Self {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            n_heads,
            n_kv_heads,
            head_dim,
            _backend: Default::default(),
        }
    }

    /// `x` `[batch, len, hidden]`; `bias` `[batch, 1, len, keys]` is 0 where a query may attend and
    /// `f32::MIN` where it may not. With a cache, `len` new positions are appended to it.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        bias: Option<&Tensor<B, 4>>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (h, kvh, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let split = |y: Tensor<B, 3>, heads: usize| y.reshape([b, t, heads, hd]).swap_dims(1, 2);
        let q = apply_rotary(split(self.q_proj.forward(x.clone()), h), rope);
        let k = apply_rotary(split(self.k_proj.forward(x.clone()), kvh), rope);
        let v = split(self.v_proj.forward(x), kvh);
        let (k, v) = match cache {
            Some(cache) => cache.append(k, v),
            None => (k, v),
        };
        let keys = k.dims()[2];
        let n_rep = h / kvh;

        // Group the query heads that share a key/value head along the time axis, so that
        // one matmul serves the whole group and K/V are never repeated in memory.
        let q = q.reshape([b, kvh, n_rep * t, hd]);
        let scores = q.matmul(k.swap_dims(2, 3)) * (hd as f64).powf(-0.5);
        let mut scores = scores.reshape([b, h, t, keys]);
        if let Some(bias) = bias {
            scores = scores + bias.clone();
        }
        let probs = softmax(scores, 3).reshape([b, kvh, n_rep * t, keys]);
        let out = probs.matmul(v).reshape([b, h, t, hd]);
        self.o_proj
            .forward(out.swap_dims(1, 2).reshape([b, t, h * hd]))
    }
}
