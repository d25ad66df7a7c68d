//! Autoregressive generation with a key/value cache: greedy at temperature 0, otherwise
//! temperature + nucleus (top-p) sampling from a seeded generator.

use burn::tensor::{Int, Tensor, TensorData};
use prefer_kernels::LayerBackend;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::{
    host::{DeviceReadError, read},
    linear::LinearLayer,
    model::LlamaModel,
};

/// How to pick each next token.
#[derive(Debug, Clone)]
pub struct SamplingConfig {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 keeps all).
    pub top_p: f32,
    /// Seed of the sampler.
    pub seed: u64,
    /// Upper bound on new tokens.
    pub max_new_tokens: usize,
    /// Stop tokens are not sampled before this many new tokens (transformers' `min_new_tokens`).
    pub min_new_tokens: usize,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            max_new_tokens: 128,
            min_new_tokens: 0,
        }
    }
}

/// Picks tokens from logits.
pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from `config.seed`.
    pub fn new(config: SamplingConfig) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        Self { config, rng }
    }

    /// The next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.config.temperature <= 0.0 {
            return argmax(logits);
        }
        let t = self.config.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
            .collect();
        let total: f32 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= total);
        if self.config.top_p < 1.0 {
            probs.sort_by(|a, b| b.1.total_cmp(&a.1));
            let mut cum = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cum += p.1;
                    cum >= self.config.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let mass: f32 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f32>() * mass;
        for &(id, p) in &probs {
            if r < p {
                return id;
            }
            r -= p;
        }
        probs.last().map_or(0, |p| p.0)
    }
}

/// Index of the first maximum, as `torch.argmax`.
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// The last position's logits of each row of `hidden` `[batch, len, hidden]`, on the host.
fn last_logits<B: LayerBackend, L: LinearLayer<B>>(
    model: &LlamaModel<B, L>,
    hidden: Tensor<B, 3>,
) -> Result<Vec<Vec<f32>>, DeviceReadError> {
    let [_, len, _] = hidden.dims();
    let logits: Vec<f32> = read(
        model.logits(hidden.narrow(1, len - 1, 1)),
        "the next-token logits of generation",
    )?;
    Ok(rows(logits, model.config.vocab_size))
}

/// `values` cut into rows of `width`.
fn rows(values: Vec<f32>, width: usize) -> Vec<Vec<f32>> {
    values.chunks(width.max(1)).map(<[f32]>::to_vec).collect()
}

/// Stop tokens may not be sampled before `min_new_tokens`.
fn forbid_stops(logits: &mut [f32], stop_tokens: &[u32]) {
    for &t in stop_tokens {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Generates up to `config.max_new_tokens` tokens after `prompt`, calling `on_token` with each new
/// token; stops after any of `stop_tokens` (which is included) or when `on_token` returns false.
///
/// # Errors
/// If the logits of a step cannot be read back from the device (the tokens given to `on_token`
/// so far stand; nothing after them is guessed).
pub fn generate<B: LayerBackend, L: LinearLayer<B>>(
    model: &LlamaModel<B, L>,
    prompt: &[u32],
    config: &SamplingConfig,
    stop_tokens: &[u32],
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Vec<u32>, DeviceReadError> {
    let device = model.embed_tokens.weight.device();
    let mut cache = model.new_cache();
    let mut sampler = Sampler::new(config.clone());
    let mut out = Vec::new();
    let mut input: Vec<u32> = prompt.to_vec();
    while out.len() < config.max_new_tokens && !input.is_empty() {
        let len = input.len();
        let ids = TensorData::new(
            input.iter().map(|&t| t as i64).collect::<Vec<_>>(),
            [1, len],
        );
        let hidden = model.forward_hidden(
            Tensor::<B, 2, Int>::from_data(ids, &device),
            None,
            Some(&mut cache),
        );
        let mut logits = last_logits(model, hidden)?.remove(0);
        if out.len() < config.min_new_tokens {
            forbid_stops(&mut logits, stop_tokens);
        }
        let next = sampler.sample(&logits);
        out.push(next);
        if !on_token(next) || stop_tokens.contains(&next) {
            break;
        }
        input = vec![next];
    }
    Ok(out)
}

/// Generates after each of `prompts` in one batch (left-padded, one forward per step for all rows):
/// every row samples from the same seeded generator in row order, stops at its first stop token
/// (included) or after `config.max_new_tokens`. Returns each row's new tokens.
///
/// # Errors
/// If the logits of a step cannot be read back from the device.
pub fn generate_batch<B: LayerBackend, L: LinearLayer<B>>(
    model: &LlamaModel<B, L>,
    prompts: &[Vec<u32>],
    config: &SamplingConfig,
    stop_tokens: &[u32],
) -> Result<Vec<Vec<u32>>, DeviceReadError> {
    let b = prompts.len();
    if b == 0 {
        return Ok(Vec::new());
    }
    let device = model.embed_tokens.weight.device();
    let pad = stop_tokens.first().copied().unwrap_or(0) as i64;
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0).max(1);
    // Left padding: every row's last prompt token sits in the last column. The cache is told
    // each row's padding here, so decoding never reads the mask back to count it.
    let mut ids = Vec::with_capacity(b * width);
    let mut mask: Vec<Vec<i64>> = Vec::with_capacity(b);
    let left_padding: Vec<usize> = prompts.iter().map(|p| width - p.len()).collect();
    for (p, &pads) in prompts.iter().zip(&left_padding) {
        ids.extend(std::iter::repeat_n(pad, pads).chain(p.iter().map(|&t| t as i64)));
        mask.push(
            std::iter::repeat_n(0, pads)
                .chain(std::iter::repeat_n(1, p.len()))
                .collect(),
        );
    }
    let upload_mask = |mask: &[Vec<i64>]| {
        let keys = mask[0].len();
        Tensor::<B, 2, Int>::from_data(TensorData::new(mask.concat(), [b, keys]), &device)
    };
    let mut cache = model.new_cache_left_padded(left_padding);
    let mut sampler = Sampler::new(config.clone());
    let mut out = vec![Vec::new(); b];
    let mut done = vec![false; b];
    let mut input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, width]), &device);
    for step in 0..config.max_new_tokens {
        let hidden = model.forward_hidden(input, Some(upload_mask(&mask)), Some(&mut cache));
        let mut next = Vec::with_capacity(b);
        for (r, mut logits) in last_logits(model, hidden)?.into_iter().enumerate() {
            if done[r] {
                next.push(pad);
                continue;
            }
            if step < config.min_new_tokens {
                forbid_stops(&mut logits, stop_tokens);
            }
            let t = sampler.sample(&logits);
            out[r].push(t);
            done[r] = stop_tokens.contains(&t);
            next.push(t as i64);
        }
        if done.iter().all(|&d| d) {
            break;
        }
        for (m, d) in mask.iter_mut().zip(&done) {
            m.push(if *d { 0 } else { 1 });
        }
        input = Tensor::from_data(TensorData::new(next, [b, 1]), &device);
    }
    Ok(out)
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use burn::backend::NdArray;

    use super::*;
    use crate::{DenseFactory, MemoryWeights};

    /// One batch of prompts of different lengths (left-padded) gives each prompt's own greedy
    /// continuation, a row stops at its stop token, and `min_new_tokens` keeps stop tokens out.
    #[test]
    fn batched_generation_matches_one_prompt_at_a_time() {
        let config = crate::test_util::tiny_config();
        let mut weights = MemoryWeights::random(&config, 0.5, 7);
        let device = Default::default();
        let model: crate::DenseLlama<NdArray> =
            LlamaModel::from_weights(&config, &mut weights, &DenseFactory, &device).unwrap();
        let prompts = vec![vec![3, 9, 4, 1, 7], vec![5], vec![8, 2, 2]];
        let greedy = SamplingConfig {
            temperature: 0.0,
            max_new_tokens: 6,
            ..Default::default()
        };
        let one_by_one: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| generate(&model, p, &greedy, &[], |_| true).unwrap())
            .collect();
        assert_eq!(
            generate_batch(&model, &prompts, &greedy, &[]).unwrap(),
            one_by_one
        );

        // A stop token: a row ends at it, the others go on.
        let stop = one_by_one[1][2];
        let stopped = generate_batch(&model, &prompts, &greedy, &[stop]).unwrap();
        for (row, full) in stopped.iter().zip(&one_by_one) {
            let end = full
                .iter()
                .position(|&t| t == stop)
                .map_or(full.len(), |i| i + 1);
            assert_eq!(row, &full[..end]);
        }
        // Until `min_new_tokens`, the stop token is never sampled.
        let min = SamplingConfig {
            min_new_tokens: 6,
            ..greedy.clone()
        };
        for row in generate_batch(&model, &prompts, &min, &[stop]).unwrap() {
            assert_eq!(row.len(), 6);
            assert!(!row.contains(&stop));
        }
    }

    /// The cached forward takes each row's left padding from the cache, built on the host with
    /// the batch, not from the attention mask read back at every step; a mask with a cache that
    /// does not know the padding is refused rather than given positions that count the padding.
    #[test]
    #[should_panic(expected = "needs a cache made by new_cache_left_padded")]
    fn a_masked_cached_forward_needs_the_rows_left_padding() {
        let config = crate::test_util::tiny_config();
        let mut weights = MemoryWeights::random(&config, 0.5, 7);
        let device = Default::default();
        let model: crate::DenseLlama<NdArray> =
            LlamaModel::from_weights(&config, &mut weights, &DenseFactory, &device).unwrap();
        let ids =
            Tensor::<NdArray, 2, Int>::from_data(TensorData::new(vec![0i64, 5], [1, 2]), &device);
        let mask =
            Tensor::<NdArray, 2, Int>::from_data(TensorData::new(vec![0i64, 1], [1, 2]), &device);
        model.forward_hidden(ids, Some(mask), Some(&mut model.new_cache()));
    }
}
