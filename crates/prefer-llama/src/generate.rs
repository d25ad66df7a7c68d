//! Autoregressive generation with a key/value cache: greedy at temperature 0, otherwise
//! temperature + nucleus (top-p) sampling from a seeded generator.

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::{linear::LinearLayer, model::LlamaModel};

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
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            max_new_tokens: 128,
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

/// Generates up to `config.max_new_tokens` tokens after `prompt`, calling `on_token` with each new
/// token; stops after any of `stop_tokens` (which is included) or when `on_token` returns false.
pub fn generate<B: Backend, L: LinearLayer<B>>(
    model: &LlamaModel<B, L>,
    prompt: &[u32],
    config: &SamplingConfig,
    stop_tokens: &[u32],
    mut on_token: impl FnMut(u32) -> bool,
) -> Vec<u32> {
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
        let last = hidden.narrow(1, len - 1, 1);
        let logits: Vec<f32> = model
            .logits(last)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap_or_default();
        let next = sampler.sample(&logits);
        out.push(next);
        if !on_token(next) || stop_tokens.contains(&next) {
            break;
        }
        input = vec![next];
    }
    out
}
