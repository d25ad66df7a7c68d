//! Small helpers for unit tests.

use crate::config::{LlamaConfig, RopeScaling};

/// A tiny valid config.
pub fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 32,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 1,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        max_position_embeddings: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::Default,
        tie_word_embeddings: false,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        bos_token_id: None,
        eos_token_ids: vec![],
        pad_token_id: None,
    }
}
