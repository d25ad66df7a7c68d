//! Rotary position embeddings in the Hugging Face "rotate-half" layout: dimension `i` pairs with
//! `i + head_dim/2` (not the interleaved pairs of the RoPE paper and of `burn-nn`).

use burn::tensor::{Tensor, TensorData, backend::Backend};
use prefer_kernels::RopeBackend;

use crate::config::{LlamaConfig, RopeScaling};

/// Per-pair rotation frequencies, computed once per model.
///
/// The arithmetic follows transformers step by step in f32 (its `inv_freq` buffer and the
/// `inv_freq * position` product are f32 even in an f64 model), so angles agree to the last bit.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f32>,
}

/// `cos` and `sin` tables `[tokens, head_dim / 2]` for token-major rows, one row per token.
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    /// Cosine of every angle.
    pub cos: Tensor<B, 2>,
    /// Sine of every angle.
    pub sin: Tensor<B, 2>,
}

impl<B: Backend> RopeTables<B> {
    /// The tables in the floating type `dtype` (angles are computed in f32 on the host).
    pub fn cast(self, dtype: burn::tensor::DType) -> Self {
        Self {
            cos: crate::linear::cast_to(self.cos, dtype),
            sin: crate::linear::cast_to(self.sin, dtype),
        }
    }
}

impl RotaryEmbedding {
    /// Frequencies for the config's head width, base and scaling.
    pub fn new(config: &LlamaConfig) -> Self {
        let dim = config.head_dim;
        let base = config.rope_theta as f32;
        let inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
            .collect();
        let inv_freq = match &config.rope_scaling {
            RopeScaling::Default => inv_freq,
            RopeScaling::FreqFactors(factors) => {
                inv_freq.iter().zip(factors).map(|(f, d)| f / d).collect()
            }
            RopeScaling::Linear { factor } => {
                inv_freq.into_iter().map(|f| f / *factor as f32).collect()
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, low, high, old) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                    *original_max_position_embeddings as f32,
                );
                let low_freq_wavelen = old / low;
                let high_freq_wavelen = old / high;
                inv_freq
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen > low_freq_wavelen {
                            f / factor
                        } else if wavelen < high_freq_wavelen {
                            f
                        } else {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        Self { inv_freq }
    }

    /// Tables for tokens at the given positions (`[tokens, head_dim / 2]`).
    pub fn tables<B: Backend>(&self, positions: &[usize], device: &B::Device) -> RopeTables<B> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for f in &self.inv_freq {
                let angle = (f * p as f32) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let shape = [positions.len(), half];
        RopeTables {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
        }
    }
}

/// Rotates `x` `[tokens, heads · head_dim]`: `x·cos + rotate_half(x)·sin` per head.
pub fn apply_rotary<B: RopeBackend>(
    x: Tensor<B, 2>,
    tables: &RopeTables<B>,
    heads: usize,
) -> Tensor<B, 2> {
    prefer_kernels::rope(x, tables.cos.clone(), tables.sin.clone(), heads)
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    #[test]
    fn rotate_half_pairs_i_with_i_plus_half() {
        let mut config = crate::test_util::tiny_config();
        config.head_dim = 4;
        let rope = RotaryEmbedding::new(&config);
        let device = Default::default();
        let tables = rope.tables::<NdArray>(&[1], &device);
        // e0 at position 1 rotates towards e2 (its rotate-half partner) by angle inv_freq[0] = 1.
        let x = Tensor::<NdArray, 2>::from_data(
            TensorData::new(vec![1.0f32, 0.0, 0.0, 0.0], [1, 4]),
            &device,
        );
        let y: Vec<f32> = apply_rotary(x, &tables, 1).into_data().to_vec().unwrap();
        let expected = [1f32.cos(), 0.0, 1f32.sin(), 0.0];
        for (a, b) in y.iter().zip(expected) {
            assert!((a - b).abs() < 1e-7, "{y:?}");
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let mut config = crate::test_util::tiny_config();
        config.head_dim = 64;
        config.rope_theta = 500_000.0;
        let plain = RotaryEmbedding::new(&config).inv_freq;
        config.rope_scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let scaled = RotaryEmbedding::new(&config).inv_freq;
        assert_eq!(scaled[0], plain[0]);
        assert_eq!(scaled[31], plain[31] / 8.0);
        assert!(
            scaled
                .iter()
                .zip(&plain)
                .any(|(s, p)| *s < *p && *s > *p / 8.0)
        );
    }
}
