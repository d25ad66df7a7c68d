//! Embedding prefer: load a checkpoint (Hugging Face directory or GGUF), chat with it.
//!
//! ```sh
//! cargo run --example generate -- tests/fixtures/llama/gqa_f32 "Hello"
//! cargo run --example generate -- SmolLM2-135M-Instruct.Q4_1.gguf "What is the capital of France?"
//! ```

use burn::backend::NdArray;
use prefer::llama::{ChatMessage, SamplingConfig, generate, load_dense};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(model_path), Some(question)) = (args.next(), args.next()) else {
        return Err("usage: generate MODEL QUESTION".into());
    };
    let device = Default::default();
    let (model, tokenizer) = load_dense::<NdArray>(model_path.as_ref(), &device)?;
    let tokenizer = tokenizer.ok_or("the checkpoint has no tokenizer")?;

    let prompt = tokenizer.apply_chat_template(&[ChatMessage::new("user", question)], true)?;
    let ids = tokenizer.encode(&prompt, false)?;
    let config = SamplingConfig {
        temperature: 0.0,
        max_new_tokens: 48,
        ..Default::default()
    };
    let out = generate(&model, &ids, &config, &model.config.eos_token_ids, |_| true)?;
    println!("{}", tokenizer.decode(&out, true)?);
    Ok(())
}
