//! `prefer generate`: stream a completion to stdout.

use std::{io::Write, path::PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use prefer::{
    backend::{BackendJob, BackendKind, run_on},
    llama::{
        ChatMessage, ChatTokenizer, Checkpoint, DenseFactory, DenseLinear, LinearLayer, LlamaModel,
        SamplingConfig, generate, generate_batch,
    },
    quant::{Nf4Factory, Nf4Linear},
};

pub const EXAMPLES: &str = "Examples:
  prefer generate --model SmolLM2-135M-Instruct.Q4_1.gguf --chat --prompt \"What is the capital of France?\" --temperature 0
  prefer generate --model path/to/hf-model --prompt \"Once upon a time\" --max-new-tokens 64 --temperature 0.8 --top-p 0.95 --seed 7
  prefer generate --model path/to/hf-model --chat --system \"Answer in one word.\" --prompt \"Largest planet?\" --backend wgpu";

#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    /// A Hugging Face model directory or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// The prompt text; repeat for several prompts, generated in one batch.
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    /// Completions per prompt (transformers' `num_return_sequences`). With several prompts or
    /// completions, all rows are generated in one batch and printed as JSON Lines
    /// `{"prompt", "completion"}` (TRL's prompt-completion format) once done.
    #[arg(long, default_value_t = 1)]
    pub num_return_sequences: usize,
    /// Wrap the prompt in the model's chat template, with a generation prompt.
    #[arg(long)]
    pub chat: bool,
    /// A system message (with --chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// End-of-sequence tokens are not sampled before this many new tokens (transformers'
    /// `min_new_tokens`).
    #[arg(long, default_value_t = 0)]
    pub min_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Backend: ndarray, flex, wgpu or cuda (among those compiled in).
    #[arg(long, default_value = "flex", value_parser = crate::parse_backend)]
    pub backend: BackendKind,
}

struct GenerateJob(GenerateArgs);

impl BackendJob for GenerateJob {
    type Output = Result<()>;
    fn run<B: prefer::kernels::PreferBackend>(self, device: B::Device) -> Result<()> {
        // A bitsandbytes 4-bit checkpoint stays in NF4; anything else loads in full precision.
        let mut ckpt = Checkpoint::open(&self.0.model)?;
        let tokenizer = ckpt.tokenizer.take();
        if ckpt.is_bnb_4bit() {
            let model: LlamaModel<B, Nf4Linear<B>> = ckpt.build(&Nf4Factory::default(), &device)?;
            return self.generate(&model, tokenizer);
        }
        let model: LlamaModel<B, DenseLinear<B>> = ckpt.build(&DenseFactory, &device)?;
        self.generate(&model, tokenizer)
    }
}

impl GenerateJob {
    fn generate<B: prefer::kernels::LayerBackend, L: LinearLayer<B>>(
        &self,
        model: &LlamaModel<B, L>,
        tokenizer: Option<ChatTokenizer>,
    ) -> Result<()> {
        let args = &self.0;
        let tokenizer = tokenizer
            .with_context(|| format!("{}: the model has no tokenizer", args.model.display()))?;
        let mut stops = model.config.eos_token_ids.clone();
        if let Some(id) = tokenizer
            .eos_token
            .as_deref()
            .and_then(|t| tokenizer.token_id(t))
        {
            stops.push(id);
        }
        let config = SamplingConfig {
            temperature: args.temperature,
            top_p: args.top_p,
            seed: args.seed,
            max_new_tokens: args.max_new_tokens,
            min_new_tokens: args.min_new_tokens,
        };
        let prompts = args
            .prompt
            .iter()
            .map(|p| self.encode(&tokenizer, p))
            .collect::<Result<Vec<_>>>()?;
        if prompts.len() == 1 && args.num_return_sequences == 1 {
            return stream(model, &tokenizer, &prompts[0], &config, &stops);
        }
        // Every prompt `num_return_sequences` times, in one batch.
        let rows: Vec<Vec<u32>> = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), args.num_return_sequences))
            .collect();
        let completions = generate_batch(model, &rows, &config, &stops)?;
        let mut out = std::io::stdout().lock();
        for (i, mut tokens) in completions.into_iter().enumerate() {
            tokens.retain(|t| !stops.contains(t));
            let line = serde_json::json!({
                "prompt": args.prompt[i / args.num_return_sequences],
                "completion": tokenizer.decode(&tokens, true)?,
            });
            writeln!(out, "{line}")?;
        }
        Ok(())
    }

    /// One prompt's token ids, through the chat template with `--chat`.
    fn encode(&self, tokenizer: &ChatTokenizer, text: &str) -> Result<Vec<u32>> {
        let args = &self.0;
        let prompt = if args.chat {
            let mut messages = Vec::new();
            if let Some(system) = &args.system {
                messages.push(ChatMessage::new("system", system));
            }
            messages.push(ChatMessage::new("user", text));
            tokenizer.apply_chat_template(&messages, true)?
        } else {
            text.to_string()
        };
        // A chat template writes its own special tokens; plain prompts get the tokenizer's (e.g. BOS).
        let ids = tokenizer.encode(&prompt, !args.chat)?;
        if ids.is_empty() {
            bail!("the prompt {text:?} is empty after tokenisation");
        }
        Ok(ids)
    }
}

/// One prompt, its tokens streamed to stdout as they come.
fn stream<B: prefer::kernels::LayerBackend, L: LinearLayer<B>>(
    model: &LlamaModel<B, L>,
    tokenizer: &ChatTokenizer,
    ids: &[u32],
    config: &SamplingConfig,
    stops: &[u32],
) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = 0;
    let mut failure = None;
    let generation = generate(model, ids, config, stops, |token| {
        if stops.contains(&token) {
            return false;
        }
        generated.push(token);
        // Decode everything so far and print the new suffix, holding back an incomplete UTF-8 tail.
        match tokenizer.decode(&generated, true) {
            Ok(text) if !text.ends_with('\u{FFFD}') => {
                // Text already printed never changes; `get` guards against a decoder that
                // rewrites earlier characters.
                let new = text.get(printed..).unwrap_or_default();
                let res = out.write_all(new.as_bytes()).and_then(|_| out.flush());
                printed = text.len();
                if let Err(e) = res {
                    failure = Some(anyhow::Error::from(e));
                    return false;
                }
            }
            Ok(_) => {}
            Err(e) => {
                failure = Some(e.into());
                return false;
            }
        }
        true
    });
    // A failure to print stopped generation first; otherwise a failed device read is the error.
    if let Some(e) = failure {
        return Err(e);
    }
    generation?;
    // What was held back as an incomplete UTF-8 tail is printed as the decoder gives it.
    let text = tokenizer.decode(&generated, true)?;
    writeln!(out, "{}", text.get(printed..).unwrap_or_default())?;
    Ok(())
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if args.temperature.is_nan() || args.temperature < 0.0 {
        bail!("--temperature must be 0 or more (got {})", args.temperature);
    }
    if args.top_p.is_nan() || args.top_p <= 0.0 || args.top_p > 1.0 {
        bail!("--top-p must be in (0, 1] (got {})", args.top_p);
    }
    let backend = args.backend;
    run_on(backend, GenerateJob(args))?
}
