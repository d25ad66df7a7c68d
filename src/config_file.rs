//! Config files in the three forms a TRL user has: prefer's TOML, TRL's CLI recipe in YAML
//! (`trl dpo --config recipe.yaml`) and a JSON dump of `DPOConfig.to_dict()`. Each becomes one flat
//! table of keys; [`RunConfig::from_table`](crate::RunConfig::from_table) answers every key.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::trl_keys::Source;

/// The file formats a config may come in, told apart by the extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `.toml`: prefer's own.
    Toml,
    /// `.yaml` / `.yml`: TRL's CLI recipes.
    Yaml,
    /// `.json`: `DPOConfig.to_dict()` (or `to_json_string()`) written to a file.
    Json,
}

impl Format {
    /// The format of `path`, by its extension.
    pub fn of(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "toml" => Some(Self::Toml),
            "yaml" | "yml" => Some(Self::Yaml),
            "json" => Some(Self::Json),
            _ => None,
        }
    }
}

/// A config file that cannot be read, naming the file and, where known, the line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{}: {message}", path.display(), line.map_or(String::new(), |l| format!(":{l}")))]
pub struct ConfigFileError {
    /// The file.
    pub path: PathBuf,
    /// The line at fault (from 1), when known.
    pub line: Option<usize>,
    /// What is wrong and what to do.
    pub message: String,
}

/// A config file's keys, in the file's order, and how to read what it leaves out.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigFile {
    /// The file.
    pub path: PathBuf,
    /// Its text (to find a key's line for an error).
    pub text: String,
    /// Its keys and values.
    pub table: Map<String, Value>,
    /// Whose defaults fill the keys it leaves out.
    pub source: Source,
}

impl ConfigFile {
    /// Reads `path` as TOML, YAML or JSON by its extension. A YAML file, or any file that sets
    /// `use_peft`, is a TRL recipe ([`Source::TrlRecipe`]).
    pub fn read(path: &Path) -> Result<Self, ConfigFileError> {
        let fail = |line: Option<usize>, message: String| ConfigFileError {
            path: path.to_path_buf(),
            line,
            message,
        };
        let format = Format::of(path).ok_or_else(|| {
            fail(
                None,
                "unknown config format: name it .toml (prefer), .yaml/.yml (a TRL recipe) or .json (DPOConfig.to_dict())".into(),
            )
        })?;
        let text = std::fs::read_to_string(path)
            .map_err(|e| fail(None, format!("cannot read the config: {e}")))?;
        let value = match format {
            Format::Toml => toml::from_str::<Value>(&text).map_err(|e| {
                let line = e.span().map(|s| line_of_offset(&text, s.start));
                fail(line, one_line(e.message()))
            })?,
            Format::Yaml => serde_norway::from_str::<Value>(&text)
                .map(numbers_from_yaml_strings)
                .map_err(|e| fail(e.location().map(|l| l.line()), one_line(&e.to_string())))?,
            Format::Json => serde_json::from_str::<Value>(&text)
                .map_err(|e| fail(Some(e.line()), e.to_string()))?,
        };
        let table = match value {
            Value::Object(map) => map,
            Value::Null => Map::new(),
            other => {
                return Err(fail(
                    None,
                    format!("a config is a table of keys, found {}", kind(&other)),
                ));
            }
        };
        let source = if format == Format::Yaml || table.contains_key("use_peft") {
            Source::TrlRecipe
        } else {
            Source::Prefer
        };
        Ok(Self {
            path: path.to_path_buf(),
            text,
            table,
            source,
        })
    }

    /// The line (from 1) where `key` is set, if it can be found.
    pub fn line_of(&self, key: &str) -> Option<usize> {
        self.text
            .lines()
            .position(|l| {
                let l = l.trim_start().trim_start_matches(['"', '\'']);
                l.strip_prefix(key).is_some_and(|rest| {
                    rest.trim_start_matches(['"', '\''])
                        .trim_start()
                        .starts_with([':', '='])
                })
            })
            .map(|i| i + 1)
    }
}

/// PyYAML (which TRL's recipes are written for) reads `1e-6` as a string and transformers'
/// argument parser turns it into a number; a YAML string that is a number becomes one here too.
fn numbers_from_yaml_strings(value: Value) -> Value {
    match value {
        Value::String(s) => {
            let t = s.trim();
            if let Ok(i) = t.parse::<i64>() {
                return i.into();
            }
            match t.parse::<f64>() {
                Ok(x) if x.is_finite() && t.chars().any(|c| c.is_ascii_digit()) => {
                    serde_json::Number::from_f64(x).map_or(Value::String(s), Value::Number)
                }
                _ => Value::String(s),
            }
        }
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, numbers_from_yaml_strings(v)))
                .collect(),
        ),
        Value::Array(items) => {
            Value::Array(items.into_iter().map(numbers_from_yaml_strings).collect())
        }
        other => other,
    }
}

fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].lines().count().max(1)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a table",
    }
}

/// A multi-line parser message as one line.
pub fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}
