//! Grouped-query self-attention with rotary positions and an optional key/value cache.

use burn::{
    module::Module,
    tensor::{Tensor, activation::softmax, backend::Backend},
};

use prefer_kernels::{HeadShape, LayerBackend, SeqLayout, varlen_attention};

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

    fn shape(&self) -> HeadShape {
        HeadShape {
            heads: self.n_heads,
            kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        }
    }

    fn scale(&self) -> f64 {
        (self.head_dim as f64).powf(-0.5)
    }

    /// Rotated queries and keys and the values, token-major: `[batch · len, heads · head_dim]`.
    fn qkv(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>)
    where
        B: LayerBackend,
    {
        let [b, t, _] = x.dims();
        let (h, kvh, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let rows = |y: Tensor<B, 3>, heads: usize| y.reshape([b * t, heads * hd]);
        let q = apply_rotary(rows(self.q_proj.forward(x.clone()), h), rope, h);
        let k = apply_rotary(rows(self.k_proj.forward(x.clone()), kvh), rope, kvh);
        let v = rows(self.v_proj.forward(x), kvh);
        (q, k, v)
    }

    /// `x` `[batch, len, hidden]` whose `batch · len` token rows split into the sequences of
    /// `layout` (a padded batch: `batch` sequences of `len`; a packed one: `batch` = 1); `rope` holds
    /// each token's angles. Causal within each sequence, nothing across them.
    pub fn forward(&self, x: Tensor<B, 3>, rope: &RopeTables<B>, layout: &SeqLayout) -> Tensor<B, 3>
    where
        B: LayerBackend,
    {
        let [b, t, _] = x.dims();
        let (q, k, v) = self.qkv(x, rope);
        let out = varlen_attention(q, k, v, layout, self.shape(), self.scale());
        self.o_proj
            .forward(out.reshape([b, t, self.n_heads * self.head_dim]))
    }

    /// Generation: `x` `[batch, len, hidden]` after the cached positions; `bias` `[batch, 1, len,
    /// keys]` is 0 where a query may attend and `f32::MIN` where it may not. The `len` new positions
    /// are appended to the cache.
    pub fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        bias: Option<&Tensor<B, 4>>,
        cache: &mut LayerCache<B>,
    ) -> Tensor<B, 3>
    where
        B: LayerBackend,
    {
        let [b, t, _] = x.dims();
        let (h, kvh, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let (q, k, v) = self.qkv(x, rope);
        let split = |y: Tensor<B, 2>, heads: usize| y.reshape([b, t, heads, hd]).swap_dims(1, 2);
        let (k, v) = cache.append(split(k, kvh), split(v, kvh));
        let keys = k.dims()[2];
        let n_rep = h / kvh;

        // Group the query heads that share a key/value head along the time axis, so that
        // one matmul serves the whole group and K/V are never repeated in memory.
        let q = split(q, h).reshape([b, kvh, n_rep * t, hd]);
        let scores = q.matmul(k.swap_dims(2, 3)) * self.scale();
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
