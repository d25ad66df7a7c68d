//! The Llama decoder: embeddings → N × (attention + MLP, each pre-normed and residual) → final norm,
//! with the LM head kept separate so callers can compute log-probs without materialising logits.

use burn::{
    module::{Module, Param, ParamId},
    nn::{Embedding, RmsNorm},
    tensor::{Bool, Int, Tensor, TensorData, backend::Backend},
};

use crate::{
    attention::Attention,
    config::LlamaConfig,
    error::Result,
    kv_cache::KvCache,
    linear::{LinearFactory, LinearLayer, LinearSite, LinearSpec, Projection},
    mlp::Mlp,
    rope::{RopeTables, RotaryEmbedding},
    weights::{WeightSource, fetch},
};

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend, L> {
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Self-attention.
    pub self_attn: Attention<B, L>,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm<B>,
    /// Feed-forward block.
    pub mlp: Mlp<B, L>,
}

impl<B: Backend, L: LinearLayer<B>> DecoderLayer<B, L> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        bias: Option<&Tensor<B, 4>>,
        cache: Option<&mut crate::kv_cache::LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), rope, bias, cache);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

/// A Llama-family causal language model, generic over the backend and the projection layer type.
#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend, L> {
    /// Token embedding `[vocab, hidden]`.
    pub embed_tokens: Embedding<B>,
    /// The decoder layers.
    pub layers: Vec<DecoderLayer<B, L>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// Output weight `[vocab, hidden]`; `None` when tied to the embedding.
    pub lm_head: Option<Param<Tensor<B, 2>>>,
    /// Architecture.
    #[module(skip)]
    pub config: LlamaConfig,
    #[module(skip)]
    rope: RotaryEmbedding,
}

/// The full-precision model.
pub type DenseLlama<B> = LlamaModel<B, crate::linear::DenseLinear<B>>;

impl<B: Backend, L: LinearLayer<B>> LlamaModel<B, L> {
    /// Builds the model from checkpoint tensors in Hugging Face naming; `factory` makes the projections.
    pub fn from_weights<F: LinearFactory<B, Layer = L>>(
        config: &LlamaConfig,
        source: &mut dyn WeightSource,
        factory: &F,
        device: &B::Device,
    ) -> Result<Self> {
        let c = config;
        let (hidden, vocab) = (c.hidden_size, c.vocab_size);
        let embed = fetch(source, "model.embed_tokens.weight", &[vocab, hidden])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let q_out = c.num_attention_heads * c.head_dim;
            let kv_out = c.num_key_value_heads * c.head_dim;
            let mut proj = |projection: Projection,
                            out_features: usize,
                            in_features: usize,
                            bias: bool|
             -> Result<L> {
                let spec = LinearSpec {
                    site: LinearSite {
                        layer: i,
                        projection,
                    },
                    out_features,
                    in_features,
                    bias,
                };
                factory.build(&spec, source, device)
            };
            let attn = Attention::new(
                proj(Projection::Q, q_out, hidden, c.qkv_bias)?,
                proj(Projection::K, kv_out, hidden, c.qkv_bias)?,
                proj(Projection::V, kv_out, hidden, c.qkv_bias)?,
                proj(Projection::O, hidden, q_out, c.o_bias)?,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.head_dim,
            );
            let mlp = Mlp::new(
                proj(Projection::Gate, c.intermediate_size, hidden, c.mlp_bias)?,
                proj(Projection::Up, c.intermediate_size, hidden, c.mlp_bias)?,
                proj(Projection::Down, hidden, c.intermediate_size, c.mlp_bias)?,
            );
            layers.push(DecoderLayer {
                input_layernorm: rms_norm(
                    source,
                    &format!("{p}.input_layernorm.weight"),
                    c,
                    device,
                )?,
                self_attn: attn,
                post_attention_layernorm: rms_norm(
                    source,
                    &format!("{p}.post_attention_layernorm.weight"),
                    c,
                    device,
                )?,
                mlp,
            });
        }
        let norm = rms_norm(source, "model.norm.weight", c, device)?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            let w = fetch(source, "lm_head.weight", &[vocab, hidden])?;
            Some(Param::initialized(ParamId::new(), w.to_tensor(device)))
        };
        Ok(Self {
            embed_tokens: Embedding {
                weight: Param::initialized(ParamId::new(), embed.to_tensor(device)),
            },
            layers,
            norm,
            lm_head,
            config: c.clone(),
            rope: RotaryEmbedding::new(c),
        })
    }

    /// Final hidden states `[batch, len, hidden]` (after the final norm) for `input_ids` `[batch, len]`.
    ///
    /// `attention_mask` `[batch, keys]` holds 1 for real tokens and 0 for padding; keys are the cached
    /// positions plus the new ones. Batches are right-padded: every row starts at position 0.
    /// With a `cache`, the new positions follow the cached ones and are appended to it.
    pub fn forward_hidden(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let device = input_ids.device();
        let [batch, len] = input_ids.dims();
        let start = cache.as_ref().map_or(0, |c| c.len);
        let rope = self.rope.tables::<B>(start, len, &device);
        let bias = attention_bias::<B>(batch, start, len, attention_mask, &device);
        let mut x = self.embed_tokens.forward(input_ids);
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(x, &rope, bias.as_ref(), layer_cache);
        }
        if let Some(c) = cache {
            c.len += len;
        }
        self.norm.forward(x)
    }

    /// The output weight `[vocab, hidden]` (the embedding when tied).
    pub fn lm_head_weight(&self) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(w) => w.val(),
            None => self.embed_tokens.weight.val(),
        }
    }

    /// Logits `[batch, len, vocab]` from hidden states.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        // `W · hᵀ` keeps the large `[vocab, hidden]` weight in its stored layout; only the small
        // `[vocab, tokens]` result is transposed.
        let [b, t, h] = hidden.dims();
        let logits = self
            .lm_head_weight()
            .matmul(hidden.reshape([b * t, h]).transpose());
        logits.transpose().reshape([b, t, self.config.vocab_size])
    }

    /// Logits `[batch, len, vocab]` for a right-padded batch.
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3> {
        self.logits(self.forward_hidden(input_ids, attention_mask, None))
    }

    /// Every projection with its site, in checkpoint order.
    pub fn projections(&self) -> Vec<(LinearSite, &L)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7);
        for (i, l) in self.layers.iter().enumerate() {
            let (a, m) = (&l.self_attn, &l.mlp);
            for (p, layer) in Projection::ALL.into_iter().zip([
                &a.q_proj,
                &a.k_proj,
                &a.v_proj,
                &a.o_proj,
                &m.gate_proj,
                &m.up_proj,
                &m.down_proj,
            ]) {
                out.push((
                    LinearSite {
                        layer: i,
                        projection: p,
                    },
                    layer,
                ));
            }
        }
        out
    }

    /// Every projection with its site, mutably (to switch or swap adapters in place).
    pub fn projections_mut(&mut self) -> Vec<(LinearSite, &mut L)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7);
        for (i, l) in self.layers.iter_mut().enumerate() {
            let (a, m) = (&mut l.self_attn, &mut l.mlp);
            for (p, layer) in Projection::ALL.into_iter().zip([
                &mut a.q_proj,
                &mut a.k_proj,
                &mut a.v_proj,
                &mut a.o_proj,
                &mut m.gate_proj,
                &mut m.up_proj,
                &mut m.down_proj,
            ]) {
                out.push((
                    LinearSite {
                        layer: i,
                        projection: p,
                    },
                    layer,
                ));
            }
        }
        out
    }

    /// A fresh cache for generation.
    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.layers.len())
    }
}

/// Additive attention bias `[batch, 1, len, keys]`: 0 where allowed, `f32::MIN` where a query would
/// look ahead or at padding. `f32::MIN` rather than −∞ keeps a fully masked (padding) row finite.
fn attention_bias<B: Backend>(
    batch: usize,
    start: usize,
    len: usize,
    attention_mask: Option<Tensor<B, 2, Int>>,
    device: &B::Device,
) -> Option<Tensor<B, 4>> {
    let keys = start + len;
    if attention_mask.is_none() && len == 1 {
        return None; // one new token sees every cached key
    }
    let causal: Vec<bool> = (0..len)
        .flat_map(|i| (0..keys).map(move |j| j > start + i))
        .collect();
    let mut masked =
        Tensor::<B, 4, Bool>::from_bool(TensorData::new(causal, [1, 1, len, keys]), device)
            .expand([batch, 1, len, keys]);
    if let Some(mask) = attention_mask {
        let padding = mask
            .equal_elem(0)
            .reshape([batch, 1, 1, keys])
            .expand([batch, 1, len, keys]);
        masked = masked.bool_or(padding);
    }
    Some(masked.float() * f32::MIN)
}

fn rms_norm<B: Backend>(
    source: &mut dyn WeightSource,
    name: &str,
    c: &LlamaConfig,
    device: &B::Device,
) -> Result<RmsNorm<B>> {
    let gamma = fetch(source, name, &[c.hidden_size])?;
    Ok(RmsNorm {
        gamma: Param::initialized(ParamId::new(), gamma.to_tensor(device)),
        epsilon: c.rms_norm_eps,
    })
}
