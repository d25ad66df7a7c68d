//! A real checkpoint: SmolLM2-135M-Instruct in llama.cpp's Q4_1 GGUF (30 layers, GQA 9/3, tied
//! embeddings, ChatML). Runs when `PREFER_SMOLLM2_GGUF` points at the file (see the README for how to
//! get it); otherwise prints a notice and passes.

use burn::backend::NdArray;
use prefer::llama::{ChatMessage, SamplingConfig, generate, load_dense};

#[test]
fn smollm2_knows_the_capital_of_france() {
    let Ok(path) = std::env::var("PREFER_SMOLLM2_GGUF") else {
        eprintln!(
            "skipped: set PREFER_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf to run this test"
        );
        return;
    };
    let (model, tok) =
        load_dense::<NdArray>(path.as_ref(), &Default::default()).expect("load SmolLM2");
    let c = &model.config;
    assert_eq!(
        (
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads
        ),
        (30, 9, 3)
    );
    assert_eq!(c.vocab_size, 49152);
    assert!(c.tie_word_embeddings);
    let tok = tok.expect("tokenizer from metadata");
    let prompt = tok
        .apply_chat_template(
            &[ChatMessage::new("user", "What is the capital of France?")],
            true,
        )
        .unwrap();
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt}");
    let ids = tok.encode(&prompt, false).unwrap();
    let stops = model.config.eos_token_ids.clone();
    let config = SamplingConfig {
        temperature: 0.0,
        max_new_tokens: 24,
        ..Default::default()
    };
    let out = generate(&model, &ids, &config, &stops, |_| true).unwrap();
    let answer = tok.decode(&out, true).unwrap();
    assert!(answer.contains("Paris"), "{answer}");
}
