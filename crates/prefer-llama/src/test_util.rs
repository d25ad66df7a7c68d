//! Small helpers for unit tests.

use crate::config::LlamaConfig;

/// A tiny valid config.
pub fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        max_position_embeddings: 64,
        ..LlamaConfig::plain(32, 16, 24, 1, 4, 2)
    }
}
