//! `prefer inspect PATH`: what a model, an adapter or a preference dataset holds, before any
//! training — parameters, dtypes, bits per parameter, rows per format, bad rows, token lengths.

use std::{
    collections::BTreeMap,
    io::Read,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use prefer::{
    dpo::data::{
        PreferenceRow, TokenizeOptions, TruncationMode, drop_truncated_away, load_file,
        tokenize_rows,
    },
    llama::{ChatTokenizer, Checkpoint, loader::GgufFile, loader::ggml_type_name},
    lora::read_peft,
};

pub const EXAMPLES: &str = "Examples:
  prefer inspect path/to/hf-model                 # parameters, dtypes, bits per parameter
  prefer inspect model.gguf
  prefer inspect runs/dpo/adapter                 # a PEFT adapter
  prefer inspect pairs.jsonl --model path/to/hf-model   # rows per format, bad rows, token lengths";

#[derive(Args, Debug, Clone)]
pub struct InspectArgs {
    /// A model directory or .gguf file, a PEFT adapter directory, or a preference data file.
    pub path: PathBuf,
    /// For a dataset: the model whose tokenizer measures token lengths.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// For a dataset with --model: the `max_length` to count dropped and truncated pairs against
    /// (TRL's default).
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
    /// For a dataset with --model: `max_prompt_length` (keep the prompt's last N tokens).
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
    /// For a dataset with --model: `max_completion_length`.
    #[arg(long)]
    pub max_completion_length: Option<usize>,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let p = &args.path;
    if !p.exists() {
        bail!("{}: no such file or directory", p.display());
    }
    if p.is_dir() && p.join("adapter_config.json").is_file() {
        adapter(p)
    } else if p.is_dir()
        || p.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        model(p)
    } else {
        let lengths = Lengths {
            max_length: args.max_length,
            tokenize: TokenizeOptions {
                max_prompt_length: args.max_prompt_length,
                max_completion_length: args.max_completion_length,
            },
        };
        dataset(p, args.model.as_deref(), lengths)
    }
}

/// The length settings a dataset is measured against.
struct Lengths {
    max_length: usize,
    tokenize: TokenizeOptions,
}

/// Name → (dtype, element count, bytes) from safetensors headers.
fn safetensors_tensors(dir: &Path) -> Result<BTreeMap<String, (String, usize, usize)>> {
    let mut out = BTreeMap::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    for f in files {
        let mut file = std::fs::File::open(&f).with_context(|| format!("{}", f.display()))?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .with_context(|| format!("{}: not a safetensors file", f.display()))?;
        let n = u64::from_le_bytes(len) as usize;
        if n > 100 << 20 {
            bail!("{}: header of {n} bytes is not plausible", f.display());
        }
        let mut header = vec![0u8; n];
        file.read_exact(&mut header)
            .with_context(|| format!("{}: truncated header", f.display()))?;
        let v: serde_json::Value = serde_json::from_slice(&header)
            .with_context(|| format!("{}: header is not JSON", f.display()))?;
        for (name, t) in v.as_object().into_iter().flatten() {
            if name == "__metadata__" {
                continue;
            }
            let dtype = t["dtype"].as_str().unwrap_or("?").to_string();
            let count = t["shape"].as_array().map_or(0, |s| {
                s.iter().filter_map(|d| d.as_u64()).product::<u64>() as usize
            });
            let offs = t["data_offsets"].as_array();
            // A malformed header (end before start) counts as 0 bytes rather than underflowing.
            let bytes = offs.map_or(0, |o| {
                let at = |i: usize| o.get(i).and_then(|x| x.as_u64()).unwrap_or(0);
                at(1).saturating_sub(at(0)) as usize
            });
            out.insert(name.clone(), (dtype, count, bytes));
        }
    }
    Ok(out)
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn model(path: &Path) -> Result<()> {
    let ckpt = Checkpoint::open(path)?;
    let c = &ckpt.config;
    let (q, kv) = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    let per_layer =
        c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size;
    let linear = c.num_hidden_layers * per_layer;
    let embed = c.vocab_size * c.hidden_size * if c.tie_word_embeddings { 1 } else { 2 };
    let params = linear + embed + (2 * c.num_hidden_layers + 1) * c.hidden_size;
    println!("model        {}", path.display());
    println!(
        "architecture {} layers, hidden {}, {} heads ({} KV, head dim {}), MLP {}, vocab {}, context {}",
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.intermediate_size,
        c.vocab_size,
        c.max_position_embeddings
    );
    println!(
        "parameters   {} ({} in the projections, {} in embeddings/head{})",
        human(params),
        human(linear),
        human(embed),
        if c.tie_word_embeddings { ", tied" } else { "" }
    );
    let (dtypes, bytes): (BTreeMap<String, usize>, usize) = if path.is_dir() {
        let t = safetensors_tensors(path)?;
        let mut d = BTreeMap::new();
        for (dtype, count, _) in t.values() {
            *d.entry(dtype.clone()).or_insert(0) += count;
        }
        (d, t.values().map(|x| x.2).sum())
    } else {
        let g = GgufFile::open(path)?;
        let mut d = BTreeMap::new();
        for info in g.tensors.values() {
            *d.entry(ggml_type_name(info.ggml_type)).or_insert(0) +=
                info.dims.iter().product::<usize>();
        }
        let size = std::fs::metadata(path)
            .map(|m| m.len() as usize)
            .unwrap_or(0);
        (d, size)
    };
    let dt: Vec<String> = dtypes
        .iter()
        .map(|(k, n)| format!("{k} ({} elements)", human(*n)))
        .collect();
    println!("stored as    {}", dt.join(", "));
    println!(
        "size         {:.1} MB, {:.2} bits per parameter{}",
        bytes as f64 / 1e6,
        bytes as f64 * 8.0 / params.max(1) as f64,
        if ckpt.is_bnb_4bit() {
            " (bitsandbytes NF4 checkpoint)"
        } else {
            ""
        }
    );
    match &ckpt.tokenizer {
        Some(t) => println!(
            "tokenizer    {} tokens, chat template: {}",
            t.inner.get_vocab_size(true),
            if t.chat_template.is_some() {
                "yes"
            } else {
                "no"
            }
        ),
        None => println!("tokenizer    none"),
    }
    Ok(())
}

fn adapter(dir: &Path) -> Result<()> {
    let (config, factors) = read_peft(dir)?;
    let params: usize = factors
        .values()
        .flat_map(|f| [Some(&f.a), Some(&f.b), f.magnitude.as_ref()])
        .flatten()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    let tensors = safetensors_tensors(dir)?;
    let mut dtypes: Vec<String> = tensors.values().map(|t| t.0.clone()).collect();
    dtypes.sort();
    dtypes.dedup();
    let targets: Vec<&str> = config.target_modules.iter().map(|p| p.hf_name()).collect();
    let kind = if config.use_dora { "DoRA" } else { "LoRA" };
    println!("adapter      {} (PEFT {kind})", dir.display());
    println!(
        "rank         r {}, lora_alpha {}, scaling {:.4}{}, dropout {}",
        config.r,
        config.lora_alpha,
        config.scaling(),
        if config.use_rslora { " (rsLoRA)" } else { "" },
        config.lora_dropout
    );
    println!("targets      {}", targets.join(", "));
    println!(
        "parameters   {} in {} projections ({} tensors), stored as {}",
        human(params),
        factors.len(),
        tensors.len(),
        dtypes.join(", ")
    );
    Ok(())
}

fn percentiles(mut v: Vec<usize>) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.sort_unstable();
    let at = |p: f64| v[((p * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
    format!(
        "P50 {:>5}  P90 {:>5}  P99 {:>5}  max {:>5}",
        at(0.5),
        at(0.9),
        at(0.99),
        v[v.len() - 1]
    )
}

fn dataset(path: &Path, model: Option<&Path>, lengths: Lengths) -> Result<()> {
    let loaded = load_file(path, None).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("dataset      {}", path.display());
    println!(
        "rows         {} usable, {} bad; format {}",
        loaded.rows.len(),
        loaded.bad.len(),
        loaded.format.map_or("unknown".into(), |f| f.to_string())
    );
    for b in loaded.bad.iter().take(5) {
        println!("  bad row    {b}");
    }
    if loaded.bad.len() > 5 {
        println!("  …and {} more", loaded.bad.len() - 5);
    }
    let Some(model) = model else {
        println!("tokens       (give --model to measure token lengths with its tokenizer)");
        return Ok(());
    };
    let ckpt = Checkpoint::open(model)?;
    let tok = ckpt
        .tokenizer
        .with_context(|| format!("{}: the model has no tokenizer", model.display()))?;
    let (pairs, bad) = tokenize_rows(&tok, &loaded.rows, TokenizeOptions::default());
    for b in bad.iter().take(5) {
        println!("  bad row    {b}");
    }
    report_lengths(&tok, &loaded.rows, &lengths);
    let lens = |f: &dyn Fn(&prefer::dpo::data::TokenizedPair) -> usize| {
        percentiles(pairs.iter().map(f).collect())
    };
    println!("tokens       ({} pairs tokenised)", pairs.len());
    println!("  prompt     {}", lens(&|p| p.prompt.len()));
    println!("  chosen     {}", lens(&|p| p.chosen.len()));
    println!("  rejected   {}", lens(&|p| p.rejected.len()));
    println!(
        "  longest    {}",
        lens(&|p| p.prompt.len() + p.chosen.len().max(p.rejected.len()))
    );
    Ok(())
}

/// How many pairs the length settings would drop (the prompt alone fills `max_length`, so no
/// completion token is left: `completion truncated away`) and how many they would truncate.
fn report_lengths(tok: &ChatTokenizer, rows: &[(String, PreferenceRow)], l: &Lengths) {
    let (pairs, _) = tokenize_rows(tok, rows, l.tokenize);
    let total = pairs.len();
    let longer = pairs
        .iter()
        .filter(|p| p.prompt.len() + p.chosen.len().max(p.rejected.len()) > l.max_length)
        .count();
    let (_, dropped) = drop_truncated_away(pairs, Some(l.max_length), TruncationMode::KeepStart);
    let mut settings = format!("max_length {}", l.max_length);
    if let Some(m) = l.tokenize.max_prompt_length {
        settings.push_str(&format!(", max_prompt_length {m}"));
    }
    if let Some(m) = l.tokenize.max_completion_length {
        settings.push_str(&format!(", max_completion_length {m}"));
    }
    println!(
        "lengths      with {settings}: {} of {total} pairs would be dropped (completion truncated \
         away), {} more truncated",
        dropped.len(),
        longer - dropped.len()
    );
    if !dropped.is_empty() {
        println!(
            "  to keep them: raise --max-length, set --max-prompt-length (keeps the prompt's end), \
             or train with on_bad_row = \"skip\" to drop them"
        );
    }
}
