//! Reference log-probs computed once, before training, and cached on disk (`precompute_ref_log_probs`).
//!
//! The cache key is a hash of everything the numbers depend on: the reference model's identity, its
//! adapter's factors, the token ids of every pair and the truncation settings. A later run with the
//! same key reads the file instead of running the reference again.

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, backend::Backend};
use prefer_kernels::PreferBackend;
use prefer_llama::{LinearLayer, LlamaModel};
use serde::{Deserialize, Serialize};

use crate::{
    data::{Packing, TokenizedPair, TruncationMode, collate},
    logps::{SequenceLogps, sequence_logps},
};

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

    /// Mixes in a tensor's values.
    pub fn tensor<B: Backend, const D: usize>(self, t: Tensor<B, D>) -> Self {
        let v: Vec<f32> = t.into_data().convert::<f32>().to_vec().unwrap_or_default();
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.bytes(&bytes)
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

/// Runs `reference` over `pairs` in batches of `batch_size`; `(chosen, rejected)` sums per pair.
pub fn compute_ref_logps<B: PreferBackend, L: LinearLayer<B>>(
    reference: &LlamaModel<B, L>,
    pairs: &[TokenizedPair],
    pad_id: u32,
    max_length: Option<usize>,
    mode: TruncationMode,
    batch_size: usize,
    packing: Packing,
) -> RefLogps {
    let device = reference.embed_tokens.weight.device();
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch_size.max(1)) {
        let refs: Vec<&TokenizedPair> = chunk.iter().collect();
        let batch = collate(&refs, pad_id, max_length, mode).to_device::<B>(&device, packing);
        let sums = sequence_logps(reference, &batch).sums;
        let (c, r) = SequenceLogps::split(sums);
        let c: Vec<f32> = c.into_data().convert::<f32>().to_vec().unwrap_or_default();
        let r: Vec<f32> = r.into_data().convert::<f32>().to_vec().unwrap_or_default();
        out.extend(c.into_iter().zip(r));
    }
    out
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
