//! Where a run's pairs come from: a file, a dataset folder, or a Hub dataset id in the local Hugging
//! Face cache (`dataset_name` in TRL's recipes), and which of its files make a split.

use std::path::{Path, PathBuf};

use prefer_dpo::data::{has_split, split_files};
use prefer_llama::hub_cache::{self, RepoKind, is_hub_id};

/// The file or folder `data` names: itself when it is on disk, else the snapshot of the Hub
/// dataset of that id in the local cache (its `main` revision).
pub fn locate(data: &Path) -> Result<PathBuf, String> {
    if data.exists() {
        return Ok(data.to_path_buf());
    }
    match data.to_str().filter(|s| is_hub_id(s)) {
        Some(id) => hub_cache::resolve(id, RepoKind::Dataset, "main").map_err(|e| e.to_string()),
        None => Err(format!("{}: no such file or directory", data.display())),
    }
}

/// The files of `split` of `data`: a file is its own split; a dataset folder or Hub id gives the
/// split's shards (in the folder of `config`, when it has several).
pub fn data_files(data: &Path, config: Option<&str>, split: &str) -> Result<Vec<PathBuf>, String> {
    let located = locate(data)?;
    if located.is_dir() {
        split_files(&located, config, split)
    } else {
        Ok(vec![located])
    }
}

/// Whether `data` is a dataset (a folder or Hub id) with a `split` split.
pub fn has_dataset_split(data: &Path, config: Option<&str>, split: &str) -> bool {
    locate(data).is_ok_and(|d| d.is_dir() && has_split(&d, config, split))
}
