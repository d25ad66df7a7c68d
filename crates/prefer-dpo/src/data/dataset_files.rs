//! The files of one split of a dataset directory, laid out as the Hugging Face Hub lays datasets
//! out: `data/train-00000-of-00002.parquet`, `train.jsonl`, `train/0000.parquet`, or per config,
//! `<config>/test-00000-of-00001.parquet`. These are the `datasets` library's default name
//! patterns for a split (its name as a folder, or at the start of a file name followed by one of
//! `-._ ` or a digit); the split-name synonyms it also accepts (`training`, `valid`, ...) and a
//! README's `configs:` table are not read.

use std::path::{Component, Path, PathBuf};

/// The data files prefer reads, by extension.
const DATA_EXTENSIONS: [&str; 3] = ["parquet", "jsonl", "json"];

/// The shards of `split` under `dir`, in path order. With `config`, only the files under the
/// folder of that name; without, the split's files must not span several config folders. The
/// error says what the directory has instead.
pub fn split_files(dir: &Path, config: Option<&str>, split: &str) -> Result<Vec<PathBuf>, String> {
    find_split(dir, config, split)?.ok_or_else(|| {
        format!(
            "{}: no `{split}` split; it has {}",
            dir.display(),
            listing(data_files(dir).iter().filter_map(|p| split_of(p)))
        )
    })
}

/// Whether `dir` has files of `split` (in `config`, when given). A dataset that cannot be read
/// this way at all (no data files, no such config, the split in several configs) is an error, so
/// that a caller falling back to another source does not hide it.
pub fn has_split(dir: &Path, config: Option<&str>, split: &str) -> Result<bool, String> {
    find_split(dir, config, split).map(|files| files.is_some())
}

/// The shards of `split`, `None` when the dataset has no such split.
fn find_split(
    dir: &Path,
    config: Option<&str>,
    split: &str,
) -> Result<Option<Vec<PathBuf>>, String> {
    let all = data_files(dir);
    if all.is_empty() {
        return Err(format!(
            "{}: no data files ({}) in this dataset",
            dir.display(),
            DATA_EXTENSIONS.map(|e| format!(".{e}")).join(", ")
        ));
    }
    let in_config: Vec<&PathBuf> = all
        .iter()
        .filter(|p| config.is_none_or(|c| config_of(p).as_deref() == Some(c)))
        .collect();
    if in_config.is_empty() {
        return Err(format!(
            "{}: no config `{}`; it has {}",
            dir.display(),
            config.unwrap_or_default(),
            listing(all.iter().filter_map(|p| config_of(p)))
        ));
    }
    let files: Vec<PathBuf> = in_config
        .into_iter()
        .filter(|p| in_split(p, split))
        .map(|p| dir.join(p))
        .collect();
    if files.is_empty() {
        return Ok(None);
    }
    let configs = listing(
        files
            .iter()
            .filter_map(|p| config_of(p.strip_prefix(dir).unwrap_or(p))),
    );
    if config.is_none() && configs.contains(',') {
        return Err(format!(
            "{}: the `{split}` split is in several configs ({configs}); choose one with \
             `dataset_config`",
            dir.display()
        ));
    }
    Ok(Some(files))
}

/// Every data file under `dir`, relative to it, sorted; hidden folders and files are skipped.
fn data_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(dir.join(&rel)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let path = rel.join(&name);
            // Hub snapshots hold symbolic links to blobs: follow them.
            let full = dir.join(&path);
            if full.is_dir() {
                stack.push(path);
            } else if path
                .extension()
                .is_some_and(|e| DATA_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
            {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn folders(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    parts.pop();
    parts
}

fn stem(rel: &Path) -> String {
    rel.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether the file at `rel` belongs to `split`: a folder of that name, or a file name starting
/// with it and then a separator or a digit.
fn in_split(rel: &Path, split: &str) -> bool {
    folders(rel).iter().any(|f| f == split)
        || stem(rel).strip_prefix(split).is_some_and(|rest| {
            rest.starts_with(|c: char| matches!(c, '-' | '.' | '_' | ' ') || c.is_ascii_digit())
        })
}

/// The word a file's name starts with (`train` of `train-00000-of-00001.parquet`), or empty.
fn name_word(rel: &Path) -> String {
    let stem = stem(rel);
    stem.split(|c: char| matches!(c, '-' | '.' | '_' | ' ') || c.is_ascii_digit())
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The split a file belongs to, for error messages: its name's first word, else its folder.
fn split_of(rel: &Path) -> Option<String> {
    let word = name_word(rel);
    if word.is_empty() {
        folders(rel).pop()
    } else {
        Some(word)
    }
}

/// The config folder of a file: its first folder, unless that is `data` or the split's own folder
/// (`train/0000.parquet`).
fn config_of(rel: &Path) -> Option<String> {
    let folders = folders(rel);
    let first = folders.first()?;
    let split_folder = folders.len() == 1 && name_word(rel).is_empty();
    (first != "data" && !split_folder).then(|| first.clone())
}

fn listing(names: impl Iterator<Item = String>) -> String {
    let mut names: Vec<String> = names.collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(name: &str, files: &[&str]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("prefer-ds-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for f in files {
            let p = dir.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"").unwrap();
        }
        dir
    }

    fn rel(dir: &Path, files: Vec<PathBuf>) -> Vec<String> {
        files
            .iter()
            .map(|p| p.strip_prefix(dir).unwrap().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn splits_are_found_by_file_name_and_by_folder() {
        let dir = tree(
            "layouts",
            &[
                "README.md",
                ".gitattributes",
                "data/train-00001-of-00002.parquet",
                "data/train-00000-of-00002.parquet",
                "data/test-00000-of-00001.parquet",
                "data/trainer_notes.txt",
            ],
        );
        assert_eq!(
            rel(&dir, split_files(&dir, None, "train").unwrap()),
            [
                "data/train-00000-of-00002.parquet",
                "data/train-00001-of-00002.parquet"
            ]
        );
        assert_eq!(
            rel(&dir, split_files(&dir, None, "test").unwrap()),
            ["data/test-00000-of-00001.parquet"]
        );
        let err = split_files(&dir, None, "validation").unwrap_err();
        assert!(
            err.ends_with("no `validation` split; it has test, train"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();

        let dir = tree("folders", &["train/0000.parquet", "test.jsonl"]);
        assert_eq!(
            rel(&dir, split_files(&dir, None, "train").unwrap()),
            ["train/0000.parquet"]
        );
        assert_eq!(
            rel(&dir, split_files(&dir, None, "test").unwrap()),
            ["test.jsonl"]
        );
        // `trainer.jsonl` is not the `train` split: a separator or a digit must follow the name.
        let prefix = tree("prefix", &["trainer.jsonl", "train_prefs.jsonl"]);
        assert_eq!(
            rel(&prefix, split_files(&prefix, None, "train").unwrap()),
            ["train_prefs.jsonl"]
        );
        for d in [dir, prefix] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn configs_are_folders_and_must_be_chosen_when_several() {
        let dir = tree(
            "configs",
            &[
                "plain/train-00000-of-00001.parquet",
                "plain/test-00000-of-00001.parquet",
                "chat/train-00000-of-00001.parquet",
            ],
        );
        let err = split_files(&dir, None, "train").unwrap_err();
        assert!(
            err.contains("in several configs (chat, plain); choose one with `dataset_config`"),
            "{err}"
        );
        assert_eq!(
            rel(&dir, split_files(&dir, Some("chat"), "train").unwrap()),
            ["chat/train-00000-of-00001.parquet"]
        );
        // One config holds the test split: no choice needed.
        assert!(split_files(&dir, None, "test").is_ok());
        assert_eq!(has_split(&dir, Some("chat"), "test"), Ok(false));
        assert_eq!(has_split(&dir, Some("plain"), "test"), Ok(true));
        // A split spread over several configs is an error, not "no such split".
        let several = tree(
            "several",
            &[
                "plain/test-00000-of-00001.parquet",
                "chat/test-00000-of-00001.parquet",
            ],
        );
        let err = has_split(&several, None, "test").unwrap_err();
        assert!(err.contains("in several configs (chat, plain)"), "{err}");
        std::fs::remove_dir_all(several).unwrap();
        let err = split_files(&dir, Some("code"), "train").unwrap_err();
        assert!(
            err.ends_with("no config `code`; it has chat, plain"),
            "{err}"
        );
        let empty = tree("empty", &["README.md"]);
        let err = split_files(&empty, None, "train").unwrap_err();
        assert!(
            err.ends_with("no data files (.parquet, .jsonl, .json) in this dataset"),
            "{err}"
        );
        for d in [dir, empty] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }
}
