//! Tokenizers and chat templates against Hugging Face `tokenizers`/transformers and SentencePiece:
//! the checkpoint's `tokenizer.json`, and tokenizers rebuilt from GGUF metadata (gpt2 BPE and
//! llama SentencePiece). Fixtures come from `tools/make_llama_fixtures.py`.

mod common;

use common::*;
use prefer::llama::{ChatMessage, ChatTokenizer, Checkpoint};

fn check_cases(tok: &ChatTokenizer, what: &str) {
    let fx = json("llama/tokenizer_fixture.json");
    for case in fx["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids(&case["ids"]),
            "{what}: {text:?}"
        );
    }
    let messages: Vec<ChatMessage> = serde_json::from_value(fx["chat_messages"].clone()).unwrap();
    let rendered = tok.apply_chat_template(&messages, true).unwrap();
    assert_eq!(
        rendered,
        fx["chat_rendered"].as_str().unwrap(),
        "{what}: chat template"
    );
    assert_eq!(
        tok.encode(&rendered, false).unwrap(),
        ids(&fx["chat_ids"]),
        "{what}: chat ids"
    );
}

#[test]
fn hf_tokenizer_and_chat_template_match_transformers() {
    let ckpt = Checkpoint::open(&fixture("llama/gqa_f32")).unwrap();
    let tok = ckpt.tokenizer.expect("tokenizer.json");
    assert_eq!(tok.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.pad_token.as_deref(), Some("<|endoftext|>"));
    check_cases(&tok, "tokenizer.json");
    // Decoding round-trips, and special tokens can be skipped.
    let ids = tok.encode("naïve café 東京", false).unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "naïve café 東京");
    let ids = tok.encode("<|im_start|>user\nHi", false).unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHi");
}

#[test]
fn gguf_gpt2_tokenizer_matches_the_hf_tokenizer() {
    let ckpt = Checkpoint::open(&fixture("llama/gguf/tiny-f32.gguf")).unwrap();
    check_cases(
        &ckpt.tokenizer.expect("tokenizer from GGUF metadata"),
        "GGUF gpt2",
    );
}

#[test]
fn gguf_sentencepiece_tokenizer_matches_sentencepiece() {
    let ckpt = Checkpoint::open(&fixture("llama/gguf/tiny-spm-vocab.gguf")).unwrap();
    let tok = ckpt.tokenizer.expect("tokenizer from GGUF metadata");
    let fx = json("llama/gguf/tiny-spm-vocab.expected.json");
    for case in fx["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        // add_special_tokens = true: `tokenizer.ggml.add_bos_token` prepends <s>.
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&case["ids"]),
            "{text:?}"
        );
    }
    let ids = tok.encode("naïve café", false).unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "naïve café");
}
