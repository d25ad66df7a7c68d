//! The synthetic shape of the step benches (the one `../shared/bench/side_by_side_cpu.py` gives TRL):
//! a random Llama of hidden 256, 4 layers, vocabulary 4096, and pairs of random tokens.

use prefer::{dpo::data::TokenizedPair, llama::LlamaConfig};

/// The bench model: vocabulary 4096, hidden 256, MLP 688, 4 layers, 4 heads (2 key/value), for
/// rows of up to `max_len` tokens.
pub fn bench_llama(max_len: usize) -> LlamaConfig {
    LlamaConfig {
        max_position_embeddings: max_len,
        pad_token_id: Some(0),
        ..LlamaConfig::plain(4096, 256, 688, 4, 4, 2)
    }
}

/// `n` pairs of a `half`-token prompt and two `half`-token completions, tokens drawn from
/// `1..vocab` by one xorshift stream (the same tokens in every bench and run).
pub fn random_pairs(n: usize, half: usize, vocab: usize) -> Vec<TokenizedPair> {
    let mut s = 0x9e37_79b9_u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        1 + (s % (vocab as u64 - 1)) as u32
    };
    (0..n)
        .map(|i| TokenizedPair {
            location: format!("bench:{i}"),
            prompt: (0..half).map(|_| next()).collect(),
            chosen: (0..half).map(|_| next()).collect(),
            rejected: (0..half).map(|_| next()).collect(),
            label: None,
        })
        .collect()
}
