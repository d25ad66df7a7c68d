//! The model against transformers: per-token log-probs (f64 reference), right-padded batches,
//! greedy continuations with the KV cache, for every checkpoint variant and GGUF tensor type.
//! Fixtures come from `tools/make_llama_fixtures.py`.

mod common;

use common::*;
use prefer::llama::{Checkpoint, SamplingConfig, generate, load_dense};

const VARIANTS: [&str; 6] = [
    "gqa_f32",
    "tied_bf16_sharded",
    "llama3_rope_f16",
    "linear_rope",
    "bias",
    "qwen2",
];
/// f32 compute against an f64 reference.
const REL: f64 = 1e-5;
const ABS: f64 = 1e-6;

struct HfParity(&'static str);

impl Checker for HfParity {
    fn run<B: prefer::kernels::PreferBackend>(&self, device: &B::Device) {
        let name = self.0;
        let dir = fixture(&format!("llama/{name}"));
        let expected = json(&format!("llama/{name}/expected.json"));
        let (model, _) = load_dense::<B>(&dir, device).unwrap_or_else(|e| panic!("{name}: {e}"));
        let rows: Vec<Vec<u32>> = expected["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();

        // Each sequence alone.
        for (i, row) in rows.iter().enumerate() {
            let got = token_logprobs(&model, std::slice::from_ref(row), false, device).remove(0);
            assert_close(
                &format!("{name} seq {i}"),
                &got,
                &floats(&expected["logprobs"][i]),
                REL,
                ABS,
            );
        }
        // All three in one right-padded batch with an attention mask.
        let got = token_logprobs(&model, &rows, true, device);
        for (i, g) in got.iter().enumerate() {
            assert_close(
                &format!("{name} padded row {i}"),
                g,
                &floats(&expected["padded"]["logprobs"][i]),
                REL,
                ABS,
            );
        }
        // Greedy continuation through the KV cache.
        let greedy = &expected["greedy"];
        let config = SamplingConfig {
            temperature: 0.0,
            max_new_tokens: greedy["max_new_tokens"].as_u64().unwrap() as usize,
            ..Default::default()
        };
        let out = generate(&model, &ids(&greedy["prompt"]), &config, &[], |_| true).unwrap();
        assert_eq!(out, ids(&greedy["output"]), "{name}: greedy continuation");
    }
}

#[test]
fn hf_checkpoints_match_transformers() {
    for v in VARIANTS {
        on_each_backend(v, HfParity(v));
    }
}

struct GgufParity(&'static str);

impl Checker for GgufParity {
    fn run<B: prefer::kernels::PreferBackend>(&self, device: &B::Device) {
        let file = self.0;
        let path = fixture(&format!("llama/gguf/{file}"));
        let expected = json(&format!("llama/gguf/{file}.expected.json"));
        // Dequantised tensors, bit for bit, after undoing llama.cpp's Q/K permutation.
        let mut ckpt = Checkpoint::open(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        for (name, values) in expected["dequantized"].as_object().unwrap() {
            let t = ckpt
                .weights
                .take(name)
                .unwrap()
                .unwrap_or_else(|| panic!("{file}: {name} missing"));
            let want: Vec<f32> = floats(values).into_iter().map(|x| x as f32).collect();
            assert_eq!(
                t.shape,
                ids(&expected["dequantized_shapes"][name])
                    .iter()
                    .map(|&x| x as usize)
                    .collect::<Vec<_>>()
            );
            assert!(
                t.data == want,
                "{file}: {name} differs from gguf-py's dequantisation"
            );
        }
        let (model, tok) = load_dense::<B>(&path, device).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(tok.is_some(), "{file}: tokenizer from metadata");
        let rows: Vec<Vec<u32>> = expected["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        for (i, row) in rows.iter().enumerate() {
            let got = token_logprobs(&model, std::slice::from_ref(row), false, device).remove(0);
            assert_close(
                &format!("{file} seq {i}"),
                &got,
                &floats(&expected["logprobs"][i]),
                REL,
                ABS,
            );
        }
    }
}

#[test]
fn gguf_files_match_transformers_on_dequantised_weights() {
    for f in ["tiny-f32.gguf", "tiny-mixed.gguf"] {
        on_each_backend(f, GgufParity(f));
    }
}
