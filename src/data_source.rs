//! Where a run's inputs come from: a path on disk, or a Hub id in the local Hugging Face cache (a
//! model, or a dataset: `dataset_name` in TRL's recipes), and which of a dataset's files make a
//! split.

use std::path::{Path, PathBuf};

use prefer_dpo::data::{has_split, split_files};
use prefer_llama::hub_cache::{self, RepoKind, is_hub_id};

/// The file or folder `path` names: itself when it is on disk, else the snapshot of the Hub repo
/// of that id and `kind` at `revision` in the local cache.
pub fn locate(path: &Path, kind: RepoKind, revision: &str) -> Result<PathBuf, String> {
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    match path.to_str().filter(|s| is_hub_id(s)) {
        Some(id) => hub_cache::resolve(id, kind, revision).map_err(|e| e.to_string()),
        None => Err(format!("{}: no such file or directory", path.display())),
    }
}

/// The file or folder `data` names (a Hub dataset at its `main` revision).
fn locate_data(data: &Path) -> Result<PathBuf, String> {
    locate(data, RepoKind::Dataset, "main")
}

/// The files of `split` of `data`: a file is its own split; a dataset folder or Hub id gives the
/// split's shards (in the folder of `config`, when it has several).
pub fn data_files(data: &Path, config: Option<&str>, split: &str) -> Result<Vec<PathBuf>, String> {
    let located = locate_data(data)?;
    if located.is_dir() {
        split_files(&located, config, split)
    } else {
        Ok(vec![located])
    }
}

/// Whether `data` is a dataset (a folder or Hub id) with a `split` split. A single file has no
/// splits; a dataset that cannot be read as one (several configs and none chosen) is an error.
pub fn has_dataset_split(data: &Path, config: Option<&str>, split: &str) -> Result<bool, String> {
    let located = locate_data(data)?;
    if located.is_dir() {
        has_split(&located, config, split)
    } else {
        Ok(false)
    }
}
