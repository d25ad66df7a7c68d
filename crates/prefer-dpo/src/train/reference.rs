//! Reference log-probs computed once, before training, and cached on disk (`precompute_ref_log_probs`).
//!
//! The cache key is a hash of everything the numbers depend on ([`cache_key`]): a format version,
//! the reference model's identity, its adapter's factors, the quantisation and compute settings, the
//! truncation settings, the batch layout and the token ids of every pair. A later run with the same
//! key reads the file instead of running the reference again; changing any of them recomputes.

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, backend::Backend};
use prefer_kernels::PreferBackend;
use prefer_llama::{LinearLayer, LlamaModel};
use serde::{Deserialize, Serialize};

use super::{TrainError, config::TrainConfig};
use crate::{
    data::{TokenizedPair, TruncationMode, check_vocab, collate},
    host::{DeviceReadError, read},
    logps::{SequenceLogps, sequence_logps},
};

/// The version of the cache's key and file: bump it whenever either changes meaning, so that files
/// written by an older prefer are never read as current.
pub const CACHE_FORMAT_VERSION: u32 = 2;

/// Reference log-prob sums of each pair: `(chosen, rejected)`.
pub type RefLogps = Vec<(f32, f32)>;

/// FNV-1a, 64 bits: a stable hash (Rust's `DefaultHasher` may change between releases).
#[derive(Debug, Clone, Copy)]
pub struct Fingerprint(pub u64);

impl Default for Fingerprint {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fingerprint {
    /// Mixes in bytes.
    pub fn bytes(mut self, bytes: &[u8]) -> Self {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // Length-delimit so that ("ab","c") and ("a","bc") differ.
        for b in (bytes.len() as u64).to_le_bytes() {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        self
    }

    /// Mixes in a string.
    pub fn str(self, s: &str) -> Self {
        self.bytes(s.as_bytes())
    }

    /// Mixes in token ids.
    pub fn ids(self, ids: &[u32]) -> Self {
        let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
        self.bytes(&bytes)
    }

    /// Mixes in a tensor's values (read from its device; a failed read is an error, not a key
    /// made of nothing).
    pub fn tensor<B: Backend, const D: usize>(
        self,
        t: Tensor<B, D>,
    ) -> Result<Self, DeviceReadError> {
        let v: Vec<f32> = read(t, "adapter factors for the reference cache key")?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        Ok(self.bytes(&bytes))
    }

    /// A model file or directory: names, sizes and modification times of its files (not their
    /// contents, which may be gigabytes).
    pub fn path(mut self, path: &Path) -> Self {
        self = self.str(&path.display().to_string());
        let mut files: Vec<PathBuf> = if path.is_dir() {
            std::fs::read_dir(path)
                .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default()
        } else {
            vec![path.to_path_buf()]
        };
        files.sort();
        for f in files {
            if let Ok(m) = f.metadata() {
                let mtime = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                self = self
                    .str(&f.file_name().unwrap_or_default().to_string_lossy())
                    .bytes(&m.len().to_le_bytes())
                    .bytes(&mtime.to_le_bytes());
            }
        }
        self
    }

    /// Pairs as they will be batched.
    pub fn pairs(
        mut self,
        pairs: &[TokenizedPair],
        max_length: Option<usize>,
        mode: TruncationMode,
    ) -> Self {
        self = self.str(&format!("{max_length:?} {mode:?}"));
        for p in pairs {
            self = self.ids(&p.prompt).ids(&p.chosen).ids(&p.rejected);
        }
        self
    }
}

/// The key of a run's cached reference log-probs: [`CACHE_FORMAT_VERSION`], `reference` (the
/// model's identity with the reference adapter's factors mixed in), every option that changes a
/// reference log-prob — quantisation (`load_in_4bit`, quant type, double quantisation), compute
/// dtype, truncation (`max_length`, `max_prompt_length`, `max_completion_length`,
/// `truncation_mode`), the batch layout, LD-DPO's `ld_alpha` — and the token ids of the train and eval pairs.
///
/// The NF4 block size is not an option of [`TrainConfig`]: whoever builds the base mixes it into
/// `reference` (the façade does).
pub fn cache_key(
    reference: Fingerprint,
    config: &TrainConfig,
    train: &[TokenizedPair],
    eval: &[TokenizedPair],
) -> Fingerprint {
    let settings = format!(
        "load_in_4bit={} bnb_4bit_quant_type={:?} bnb_4bit_use_double_quant={} \
         bnb_4bit_compute_dtype={:?} max_length={:?} max_prompt_length={:?} \
         max_completion_length={:?} truncation_mode={:?} packing={:?} ld_alpha={:?}",
        config.load_in_4bit,
        config.bnb_4bit_quant_type,
        config.bnb_4bit_use_double_quant,
        // The type the model computes in (`bf16`/`fp16` or the 4-bit compute dtype).
        config.compute_dtype(),
        config.max_length,
        config.max_prompt_length,
        config.max_completion_length,
        config.truncation_mode,
        config.packing(),
        config.ld_alpha,
    );
    let mode = config.truncation_mode;
    Fingerprint::default()
        .bytes(&CACHE_FORMAT_VERSION.to_le_bytes())
        .bytes(&reference.0.to_le_bytes())
        .str(&settings)
        .pairs(train, config.max_length, mode)
        .pairs(eval, config.max_length, mode)
}

/// Runs `reference` over `pairs` in batches of `per_device_eval_batch_size`, truncated and laid out
/// as `config` says; `(chosen, rejected)` log-probs per pair (LD-DPO-weighted with `ld_alpha`). A
/// token id beyond the model's vocabulary or a failed device read is an error.
pub fn compute_ref_logps<B: PreferBackend, L: LinearLayer<B>>(
    reference: &LlamaModel<B, L>,
    pairs: &[TokenizedPair],
    pad_id: u32,
    config: &TrainConfig,
) -> Result<RefLogps, TrainError> {
    let (max_length, mode) = (config.max_length, config.truncation_mode);
    let (batch_size, packing) = (config.per_device_eval_batch_size, config.packing());
    check_vocab(pairs, pad_id, reference.config.vocab_size)
        .map_err(|b| TrainError::Data(b.to_string()))?;
    let device = reference.embed_tokens.weight.device();
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch_size.max(1)) {
        let refs: Vec<&TokenizedPair> = chunk.iter().collect();
        let batch = collate(&refs, pad_id, max_length, mode).to_device::<B>(&device, packing);
        let sums = sequence_logps(reference, &batch).logps(config.ld_alpha);
        let (c, r) = SequenceLogps::split(sums);
        let c: Vec<f32> = read(c, "reference log-probs")?;
        let r: Vec<f32> = read(r, "reference log-probs")?;
        out.extend(c.into_iter().zip(r));
    }
    Ok(out)
}

/// The reference sums of pairs `ids` of `refs` as one tensor `[2P]` in a batch's
/// `[chosen.., rejected..]` row order: the one place that turns cached sums into a step's input.
pub fn ref_tensor<B: Backend>(refs: &RefLogps, ids: &[usize], device: &B::Device) -> Tensor<B, 1> {
    let mut v: Vec<f32> = ids.iter().map(|&i| refs[i].0).collect();
    v.extend(ids.iter().map(|&i| refs[i].1));
    Tensor::from_floats(v.as_slice(), device)
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    key: String,
    chosen: Vec<f32>,
    rejected: Vec<f32>,
}

/// The directory of cached reference log-probs: `$PREFER_CACHE_DIR`, else `$XDG_CACHE_HOME/prefer`,
/// else `~/.cache/prefer`, then `ref-logps/`.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("PREFER_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("prefer")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/prefer")))
        .unwrap_or_else(|| std::env::temp_dir().join("prefer-cache"));
    base.join("ref-logps")
}

/// Reads cached sums for `key`, if a complete file for `n` pairs is there.
pub fn read_cached(dir: &Path, key: Fingerprint, n: usize) -> Option<RefLogps> {
    let path = dir.join(format!("{:016x}.json", key.0));
    let file: CacheFile = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    (file.key == format!("{:016x}", key.0) && file.chosen.len() == n && file.rejected.len() == n)
        .then(|| file.chosen.into_iter().zip(file.rejected).collect())
}

/// Writes sums for `key` atomically (a temporary file, then a rename).
pub fn write_cached(dir: &Path, key: Fingerprint, logps: &RefLogps) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{:016x}.json", key.0));
    let file = CacheFile {
        key: format!("{:016x}", key.0),
        chosen: logps.iter().map(|p| p.0).collect(),
        rejected: logps.iter().map(|p| p.1).collect(),
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(
        &tmp,
        serde_json::to_vec(&file).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}
