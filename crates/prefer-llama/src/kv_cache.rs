//! Keys and values of past positions, so generation computes each new token in O(context).

use burn::tensor::{Tensor, backend::Backend};

/// One layer's cached keys and values, `[batch, kv_heads, positions, head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct LayerCache<B: Backend> {
    kv: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
}

impl<B: Backend> LayerCache<B> {
    /// Appends new keys and values and returns everything cached so far.
    pub fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let (k, v) = match self.kv.take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        self.kv = Some((k.clone(), v.clone()));
        (k, v)
    }
}

/// The cache of every layer, plus how many positions it holds and each row's left padding.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// One entry per decoder layer.
    pub layers: Vec<LayerCache<B>>,
    /// Positions already processed.
    pub len: usize,
    /// Leading padding tokens of each row of a left-padded batch (empty: no row is padded).
    /// Known on the host when the batch is built, so the cached forward computes each row's
    /// positions without reading the attention mask back from the device at every step.
    pub left_padding: Vec<usize>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for a model with `n_layers` layers, for rows without left padding.
    pub fn new(n_layers: usize) -> Self {
        Self::left_padded(n_layers, Vec::new())
    }

    /// An empty cache for a batch whose row `r` starts with `left_padding[r]` padding tokens.
    pub fn left_padded(n_layers: usize, left_padding: Vec<usize>) -> Self {
        Self {
            layers: (0..n_layers).map(|_| LayerCache { kv: None }).collect(),
            len: 0,
            left_padding,
        }
    }
}
