//! Hub ids (`HuggingFaceTB/SmolLM2-135M-Instruct`) resolved in the local Hugging Face cache,
//! offline, as `huggingface_hub` lays it out: `<cache>/models--org--name/refs/<revision>` holds a
//! commit, whose files are in `snapshots/<commit>/`. Nothing is downloaded.

use std::path::{Path, PathBuf};

use crate::error::{LoadError, Result};

/// What a Hub id names: its folder prefix in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    /// `models--org--name`.
    Model,
    /// `datasets--org--name`.
    Dataset,
}

impl RepoKind {
    fn prefix(self) -> &'static str {
        match self {
            Self::Model => "models",
            Self::Dataset => "datasets",
        }
    }
}

/// The cache `huggingface_hub` uses: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return dir;
    }
    let home = var("HF_HOME").unwrap_or_else(|| {
        var("XDG_CACHE_HOME")
            .or_else(|| var("HOME").map(|h| h.join(".cache")))
            .unwrap_or_else(|| PathBuf::from(".cache"))
            .join("huggingface")
    });
    home.join("hub")
}

/// Whether `s` can be a Hub id (`name` or `org/name` of letters, digits, `-`, `_`, `.`) rather than
/// a path: only a string that does not exist on disk is ever looked up.
pub fn is_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    let ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(parts.len(), 1 | 2) && parts.iter().all(|p| ok(p))
}

/// The snapshot directory of `id` at `revision` (a branch or tag under `refs/`, or a commit) in
/// the default cache.
pub fn resolve(id: &str, kind: RepoKind, revision: &str) -> Result<PathBuf> {
    resolve_in(&hub_cache_dir(), id, kind, revision)
}

/// [`resolve`] in the cache at `cache`.
pub fn resolve_in(cache: &Path, id: &str, kind: RepoKind, revision: &str) -> Result<PathBuf> {
    let repo = cache.join(format!("{}--{}", kind.prefix(), id.replace('/', "--")));
    let fetch = match kind {
        RepoKind::Model => format!("`hf download {id}`"),
        RepoKind::Dataset => format!("`hf download --repo-type dataset {id}`"),
    };
    let missing = |what: String| LoadError::Config {
        path: repo.clone(),
        message: format!(
            "`{id}` is neither a local path nor in the Hugging Face cache ({what}); fetch it with {fetch}, set HF_HUB_CACHE or HF_HOME to the cache that has it, or give a local path"
        ),
    };
    if !repo.is_dir() {
        return Err(missing(format!("looked in {}", cache.display())));
    }
    let commit = match std::fs::read_to_string(repo.join("refs").join(revision)) {
        Ok(text) => text.trim().to_string(),
        Err(_) if is_commit(revision) => revision.to_string(),
        Err(_) => {
            let refs = names_in(&repo.join("refs"));
            return Err(missing(format!(
                "no revision `{revision}`; it has {}",
                if refs.is_empty() {
                    "no refs".to_string()
                } else {
                    refs.join(", ")
                }
            )));
        }
    };
    let snapshot = repo.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        return Err(missing(format!(
            "revision `{revision}` is commit {commit}, whose snapshot is not there"
        )));
    }
    Ok(snapshot)
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("prefer-hub-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let repo = dir.join("models--Org--tiny-model");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), format!("{commit}\n")).unwrap();
        dir
    }

    #[test]
    fn ids_resolve_to_the_snapshot_of_their_revision() {
        let dir = cache("resolve");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let want = dir.join("models--Org--tiny-model/snapshots").join(commit);
        assert_eq!(
            resolve_in(&dir, "Org/tiny-model", RepoKind::Model, "main").unwrap(),
            want
        );
        assert_eq!(
            resolve_in(&dir, "Org/tiny-model", RepoKind::Model, commit).unwrap(),
            want
        );
        for (id, kind, rev, says) in [
            (
                "Org/other",
                RepoKind::Model,
                "main",
                "hf download Org/other",
            ),
            (
                "Org/tiny-model",
                RepoKind::Dataset,
                "main",
                "--repo-type dataset",
            ),
            (
                "Org/tiny-model",
                RepoKind::Model,
                "v2",
                "no revision `v2`; it has main",
            ),
        ] {
            let err = resolve_in(&dir, id, kind, rev).unwrap_err().to_string();
            assert!(
                err.contains(says) && err.contains("nor in the Hugging Face cache"),
                "{err}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_id_shaped_strings_are_looked_up() {
        for id in [
            "gpt2",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "org/name.v1_2",
        ] {
            assert!(is_hub_id(id), "{id}");
        }
        for path in [
            "./model",
            "/abs/model",
            "a/b/c",
            "../up",
            "model.gguf/",
            "",
            "a b",
        ] {
            assert!(!is_hub_id(path), "{path}");
        }
    }
}
