//! Rotary position embeddings in the Hugging Face "rotate-half" layout: dimension `i` pairs with
//! `i + head_dim/2` (not the interleaved pairs of the RoPE paper and of `burn-nn`).

use burn::tensor::{Tensor, TensorData, backend::Backend};

use crate::config::{LlamaConfig, RopeScaling};

/// Per-pair rotation frequencies, computed once per model.
///
/// The arithmetic follows transformers step by step in f32 (its `inv_freq` buffer and the
/// `inv_freq * position` product are f32 even in an f64 model), so angles agree to the last bit.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f32>,
}

/// `cos` and `sin` tables `[1, 1, len, head_dim]` for a run of positions.
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    /// Cosine of every angle, duplicated over both halves.
    pub cos: Tensor<B, 4>,
    /// Sine of every angle, duplicated over both halves.
    pub sin: Tensor<B, 4>,
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

    /// Tables for positions `start .. start + len`.
    pub fn tables<B: Backend>(
        &self,
        start: usize,
        len: usize,
        device: &B::Device,
    ) -> RopeTables<B> {
        let half = self.inv_freq.len();
        let dim = 2 * half;
        let mut cos = Vec::with_capacity(len * dim);
        let mut sin = Vec::with_capacity(len * dim);
        for p in start..start + len {
            let row: Vec<f32> = self.inv_freq.iter().map(|f| f * p as f32).collect();
            for _ in 0..2 {
                cos.extend(row.iter().map(|a| (*a as f64).cos() as f32));
                sin.extend(row.iter().map(|a| (*a as f64).sin() as f32));
            }
        }
        let shape = [1, 1, len, dim];
        RopeTables {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
        }
    }
}

/// Rotates `x` `[batch, heads, len, head_dim]`: `x·cos + rotate_half(x)·sin`.
pub fn apply_rotary<B: Backend>(x: Tensor<B, 4>, tables: &RopeTables<B>) -> Tensor<B, 4> {
    let half = x.dims()[3] / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * tables.cos.clone() + rotated * tables.sin.clone()
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
        let tables = rope.tables::<NdArray>(1, 1, &device);
        // e0 at position 1 rotates towards e2 (its rotate-half partner) by angle inv_freq[0] = 1.
        let x = Tensor::<NdArray, 4>::from_data(
            TensorData::new(vec![1.0f32, 0.0, 0.0, 0.0], [1, 1, 1, 4]),
            &device,
        );
        let y: Vec<f32> = apply_rotary(x, &tables).into_data().to_vec().unwrap();
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
