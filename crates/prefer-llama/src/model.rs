//! The Llama decoder: embeddings → N × (attention + MLP, each pre-normed and residual) → final norm,
//! with the LM head kept separate so callers can compute log-probs without materialising logits.

use burn::{
    module::{Module, Param, ParamId},
    nn::{Embedding, RmsNorm},
    tensor::{
        Bool, DType, FloatDType, Int, Tensor, TensorData,
        backend::{AutodiffBackend, Backend},
    },
};

use prefer_kernels::{LayerBackend, SeqLayout, rms_norm};

use crate::{
    attention::Attention,
    checkpointing::ActivationCheckpoints,
    config::LlamaConfig,
    error::Result,
    kv_cache::KvCache,
    linear::{LinearFactory, LinearLayer, LinearSite, LinearSpec, Projection, cast_to},
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

/// RMSNorm through the fused operation (statistics in f32, a hand-written backward), in `x`'s
/// floating type.
fn norm<B: LayerBackend, const D: usize>(n: &RmsNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let gamma = cast_to(n.gamma.val(), x.dtype());
    rms_norm(x, gamma, n.epsilon)
}

impl<B: Backend, L> DecoderLayer<B, L> {
    /// The seven projections, in [`Projection::ALL`]'s order.
    fn projections(&self) -> [&L; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }
}

impl<B: Backend, L: LinearLayer<B>> DecoderLayer<B, L> {
    /// Whether a forward pass draws from the backend's generator (an adapter's dropout).
    pub(crate) fn draws_randomness(&self) -> bool {
        self.projections()
            .into_iter()
            .any(LinearLayer::draws_randomness)
    }
}

impl<B: LayerBackend, L: LinearLayer<B>> DecoderLayer<B, L> {
    /// `x` `[batch, len, hidden]` whose token rows split into `layout`'s sequences.
    pub(crate) fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        layout: &SeqLayout,
    ) -> Tensor<B, 3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(norm(&self.input_layernorm, x), rope, layout);
        h.clone() + self.mlp.forward(norm(&self.post_attention_layernorm, h))
    }

    /// Generation: new positions after the cached ones.
    fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        bias: Option<&Tensor<B, 4>>,
        cache: &mut crate::kv_cache::LayerCache<B>,
    ) -> Tensor<B, 3> {
        let h = x.clone()
            + self
                .self_attn
                .forward_cached(norm(&self.input_layernorm, x), rope, bias, cache);
        h.clone() + self.mlp.forward(norm(&self.post_attention_layernorm, h))
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
    /// Layer inputs saved for recomputation when activation checkpointing is on.
    #[module(skip)]
    checkpoints: Option<ActivationCheckpoints>,
    /// The floating type the decoder layers compute in (see [`Self::set_compute_dtype`]).
    #[module(skip)]
    compute_dtype: FloatDType,
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
                input_layernorm: load_rms_norm(
                    source,
                    &format!("{p}.input_layernorm.weight"),
                    c,
                    device,
                )?,
                self_attn: attn,
                post_attention_layernorm: load_rms_norm(
                    source,
                    &format!("{p}.post_attention_layernorm.weight"),
                    c,
                    device,
                )?,
                mlp,
            });
        }
        let norm = load_rms_norm(source, "model.norm.weight", c, device)?;
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
            checkpoints: None,
            compute_dtype: FloatDType::F32,
        })
    }
}

impl<B: LayerBackend, L: LinearLayer<B>> LlamaModel<B, L> {
    /// Final hidden states `[batch, len, hidden]` (after the final norm) for `input_ids` `[batch, len]`.
    ///
    /// Without a cache, batches are right-padded: every row starts at position 0 and its padding
    /// comes after its last real token, so causal attention never lets a real token see padding;
    /// `attention_mask` `[batch, len]` (1 for real tokens, 0 for padding) is only checked for that.
    /// With a `cache` (generation), rows may be left-padded: `attention_mask` `[batch, keys]` covers
    /// the cached positions plus the new ones, padding is masked out and positions count real
    /// tokens (each row's left padding is the cache's, see [`Self::new_cache_left_padded`]); the
    /// new positions are appended to the cache.
    ///
    /// # Panics
    /// Without a cache, if `attention_mask` marks padding before a real token (left padding) or
    /// cannot be read back to be checked. With a cache and an `attention_mask`, if the cache does
    /// not hold the left padding of each row.
    pub fn forward_hidden(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        if let Some(cache) = cache {
            return self.forward_cached(input_ids, attention_mask, cache);
        }
        if let Some(mask) = attention_mask {
            assert_right_padded(mask);
        }
        let [batch, len] = input_ids.dims();
        self.forward_layout(input_ids, &SeqLayout::uniform(batch, len))
    }

    /// Final hidden states `[1, tokens, hidden]` for sequences packed back to back in `input_ids`
    /// `[1, tokens]` (no padding): positions restart at 0 in each sequence of `layout` and no token
    /// attends across sequences.
    pub fn forward_packed(&self, input_ids: Tensor<B, 2, Int>, layout: &SeqLayout) -> Tensor<B, 3> {
        let dims = input_ids.dims();
        assert_eq!(
            dims,
            [1, layout.tokens()],
            "forward_packed: input_ids must be [1, {}] for this layout",
            layout.tokens()
        );
        self.forward_layout(input_ids, layout)
    }

    /// `input_ids` `[batch, len]` whose `batch · len` token rows split into `layout`'s sequences.
    fn forward_layout(&self, input_ids: Tensor<B, 2, Int>, layout: &SeqLayout) -> Tensor<B, 3> {
        let device = input_ids.device();
        let dtype = DType::from(self.compute_dtype);
        let rope = self
            .rope
            .tables::<B>(&layout.positions(), &device)
            .cast(dtype);
        let mut x = cast_to(self.embed_tokens.forward(input_ids), dtype);
        match &self.checkpoints {
            // Only a graph's activations are worth recomputing.
            Some(checkpoints) if B::ad_enabled(&device) => {
                x = checkpoints.forward(&self.layers, x, rope, layout);
            }
            _ => {
                for layer in &self.layers {
                    x = layer.forward(x, &rope, layout);
                }
            }
        }
        // The final norm and the LM head after it in f32: log-probs from unrounded logits.
        norm(&self.norm, cast_to(x, DType::F32))
    }

    /// Generation: `input_ids` `[batch, len]` after the cached positions; rows may be left-padded
    /// (`attention_mask` 0 for a row's leading padding), their positions then count real tokens.
    /// Each row's padding comes from the cache (set on the host when the batch was built): the
    /// mask stays on the device, where it only hides keys.
    fn forward_cached(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        let device = input_ids.device();
        let [batch, len] = input_ids.dims();
        let start = cache.len;
        let pads = cached_left_padding(cache, batch, attention_mask.is_some());
        // Left padding: a row's positions count its real tokens only.
        let positions: Vec<usize> = pads
            .iter()
            .flat_map(|&p| (start..start + len).map(move |i| i.saturating_sub(p)))
            .collect();
        let rope = self.rope.tables::<B>(&positions, &device);
        let bias = attention_bias::<B>(batch, start, len, attention_mask, &device);
        let mut x = self.embed_tokens.forward(input_ids);
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward_cached(x, &rope, bias.as_ref(), layer_cache);
        }
        cache.len += len;
        norm(&self.norm, x)
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
}

impl<B: LayerBackend + AutodiffBackend, L: LinearLayer<B>> LlamaModel<B, L> {
    /// The gradients of `loss`: its backward pass, then, with activation checkpointing on, each
    /// checkpointed decoder layer recomputed and back-propagated in turn (see
    /// [`Self::set_gradient_checkpointing`]). Without checkpointing, `loss.backward()`.
    ///
    /// # Panics
    /// As `loss.backward()`.
    pub fn backward(&self, loss: Tensor<B, 1>) -> B::Gradients {
        let mut grads = loss.backward();
        if let Some(checkpoints) = &self.checkpoints {
            checkpoints.backward(&self.layers, &mut grads);
        }
        grads
    }
}

impl<B: Backend, L> LlamaModel<B, L> {
    /// Switches layer-level activation checkpointing on or off (TRL's `gradient_checkpointing`).
    ///
    /// On, a forward pass under autodiff keeps only each decoder layer's input, and
    /// [`Self::backward`] recomputes the layers' activations one layer at a time: the step's
    /// memory holds one layer's activations instead of all of them, for about one more forward
    /// pass of the layers. The gradients are the same (the layers run the same ops again). The
    /// embedding is frozen under checkpointing (no gradient flows below the first layer), and
    /// every checkpointed forward pass must be back-propagated with [`Self::backward`], not
    /// `loss.backward()`, which would leave the layers without gradients. With adapter dropout
    /// on, each checkpointed forward pass reads a seed from the device, and panics if that read
    /// fails.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.checkpoints = on.then(ActivationCheckpoints::default);
    }

    /// Whether activation checkpointing is on.
    pub fn gradient_checkpointing(&self) -> bool {
        self.checkpoints.is_some()
    }

    /// The floating type of the decoder layers' activations and matmuls in training and
    /// evaluation forward passes (`bf16` / `fp16` in TRL's terms): the embedding output is cast to
    /// it, each projection's weight meets it there (NF4 dequantised in f32 and rounded once,
    /// f32 LoRA factors and norms cast per use, so their gradients arrive in f32), RMSNorm
    /// statistics and the attention softmax stay in f32, and the final norm and the LM head run
    /// in f32, so hidden states and log-probs leave the model in f32. Generation (the cached
    /// forward) computes in f32. The backend must support the type
    /// (`Backend::supports_dtype`); callers check that first.
    pub fn set_compute_dtype(&mut self, dtype: FloatDType) {
        self.compute_dtype = dtype;
    }

    /// The decoder layers' floating type.
    pub fn compute_dtype(&self) -> FloatDType {
        self.compute_dtype
    }

    /// Every projection with its site, in checkpoint order.
    pub fn projections(&self) -> Vec<(LinearSite, &L)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7);
        for (i, l) in self.layers.iter().enumerate() {
            for (p, layer) in Projection::ALL.into_iter().zip(l.projections()) {
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

    /// A fresh cache for a left-padded batch whose row `r` starts with `left_padding[r]` padding
    /// tokens (the zeros that lead row `r` of the attention mask passed with it).
    pub fn new_cache_left_padded(&self, left_padding: Vec<usize>) -> KvCache<B> {
        KvCache::left_padded(self.layers.len(), left_padding)
    }
}

/// Each row's left padding for a cached forward of `batch` rows.
///
/// # Panics
/// If the cache declares padding for another number of rows, or a mask comes with a cache that
/// declares none: the positions would silently count the padding as tokens.
fn cached_left_padding<B: Backend>(cache: &KvCache<B>, batch: usize, masked: bool) -> Vec<usize> {
    if cache.left_padding.is_empty() && !masked {
        return vec![0; batch];
    }
    assert_eq!(
        cache.left_padding.len(),
        batch,
        "forward_hidden: a batch of {batch} rows with an attention_mask needs a cache made by \
         new_cache_left_padded with each row's left padding ({} rows given)",
        cache.left_padding.len()
    );
    cache.left_padding.clone()
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

/// Panics unless every row of `mask` is its real tokens (1) followed by padding (0). A mask that
/// cannot be read back panics too, rather than passing a check it was never put to.
fn assert_right_padded<B: Backend>(mask: Tensor<B, 2, Int>) {
    let [_, len] = mask.dims();
    let values: Vec<i64> =
        crate::host::read(mask, "attention_mask").unwrap_or_else(|e| panic!("forward_hidden: {e}"));
    for (r, row) in values.chunks(len.max(1)).enumerate() {
        let real = row.iter().take_while(|&&m| m != 0).count();
        assert!(
            row[real..].iter().all(|&m| m == 0),
            "forward_hidden: row {r} of attention_mask has padding before a real token; batches \
             must be right-padded (use forward_packed for sequences of different lengths)"
        );
    }
}

fn load_rms_norm<B: Backend>(
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
