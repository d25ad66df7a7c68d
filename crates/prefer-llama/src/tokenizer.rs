//! The tokenizer of a checkpoint with its special tokens and chat template.

use std::path::Path;

use serde_json::Value;

use crate::{
    chat_template::{ChatMessage, ChatTemplate},
    error::{LoadError, Result},
};

/// A `tokenizers` tokenizer plus what `tokenizer_config.json` (or GGUF metadata) says about it.
#[derive(Clone)]
pub struct ChatTokenizer {
    /// The tokenizer itself (normaliser, pre-tokeniser, model, post-processor, decoder).
    pub inner: tokenizers::Tokenizer,
    /// Beginning-of-sequence token text.
    pub bos_token: Option<String>,
    /// End-of-sequence token text.
    pub eos_token: Option<String>,
    /// Padding token text.
    pub pad_token: Option<String>,
    /// The chat template, if the checkpoint has one.
    pub chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("pad_token", &self.pad_token)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl ChatTokenizer {
    /// Reads `tokenizer.json` and, when present, `tokenizer_config.json` from a model directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| LoadError::tokenizer(path.display().to_string(), e))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| LoadError::io(&config_path, e))?;
            serde_json::from_str(&text)
                .map_err(|e| LoadError::format(&config_path, format!("invalid JSON: {e}")))?
        } else {
            Value::Null
        };
        let token = |key: &str| match config.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_owned),
            _ => None,
        };
        let (bos, eos, pad) = (token("bos_token"), token("eos_token"), token("pad_token"));
        // A chat template may also live in chat_template.jinja (transformers ≥ 4.43 can save it there).
        let template = match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            _ => {
                let jinja = dir.join("chat_template.jinja");
                if jinja.is_file() {
                    Some(std::fs::read_to_string(&jinja).map_err(|e| LoadError::io(&jinja, e))?)
                } else {
                    None
                }
            }
        };
        let chat_template = template
            .map(|t| ChatTemplate::new(t, bos.clone(), eos.clone()))
            .transpose()
            .map_err(|e| {
                LoadError::tokenizer(format!("{}: chat_template", config_path.display()), e)
            })?;
        Ok(Self {
            inner,
            bos_token: bos,
            eos_token: eos,
            pad_token: pad,
            chat_template,
        })
    }

    /// Token ids of `text`; `add_special_tokens` applies the post-processor (e.g. prepends BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| LoadError::tokenizer("encode", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| LoadError::tokenizer("decode", e))
    }

    /// Id of a token given by its text.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Renders a conversation with the chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            LoadError::tokenizer("chat template", "this model has no chat template")
        })?;
        template
            .render(messages, add_generation_prompt)
            .map_err(|e| LoadError::tokenizer("chat template", e))
    }
}
