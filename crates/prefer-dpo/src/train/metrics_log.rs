//! `metrics.jsonl` and `metrics.csv` in the output directory: one row per logging step (train) and
//! per evaluation (eval, TRL's `eval_` prefix), appended as training goes.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
};

use super::TrainError;

/// One logged row: TRL's metric names, plus `step` and `epoch`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRecord {
    /// Optimiser step.
    pub step: usize,
    /// Fractional epoch.
    pub epoch: f64,
    /// Metric values (`loss`, `rewards/chosen`, … or `eval_loss`, …).
    pub values: BTreeMap<String, f64>,
}

impl LogRecord {
    /// Whether this is an evaluation row.
    pub fn is_eval(&self) -> bool {
        self.values.keys().any(|k| k.starts_with("eval_"))
    }

    /// A value by name.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.get(name).copied()
    }
}

/// The preference metrics, in the order of the CSV columns.
pub const METRICS: [&str; 14] = [
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "kl",
    "num_pairs",
    "tokens_per_second",
    "tokens",
    "tokens_computed",
];

/// CSV columns: step, epoch, the train metrics, `grad_norm`, `learning_rate`, then the eval metrics.
pub fn csv_columns() -> Vec<String> {
    let mut cols: Vec<String> = vec!["step".into(), "epoch".into()];
    cols.extend(METRICS.iter().map(|m| m.to_string()));
    cols.push("grad_norm".into());
    cols.push("learning_rate".into());
    cols.extend(METRICS.iter().map(|m| format!("eval_{m}")));
    cols
}

/// Appends rows to both files.
#[derive(Debug)]
pub struct MetricsLog {
    jsonl: PathBuf,
    csv: PathBuf,
}

fn io(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

impl MetricsLog {
    /// Opens the logs in `dir`, keeping only rows up to step `keep_through` (all rows are dropped with
    /// 0: a fresh run; a resumed run drops rows logged after its checkpoint).
    pub fn open(dir: &Path, keep_through: usize) -> Result<Self, TrainError> {
        let log = Self {
            jsonl: dir.join("metrics.jsonl"),
            csv: dir.join("metrics.csv"),
        };
        let kept = if keep_through == 0 {
            Vec::new()
        } else {
            log.read()?
                .into_iter()
                .filter(|r| r.step <= keep_through)
                .collect()
        };
        let header = csv_columns().join(",") + "\n";
        std::fs::write(&log.csv, header).map_err(|e| io(&log.csv, e))?;
        std::fs::write(&log.jsonl, "").map_err(|e| io(&log.jsonl, e))?;
        for r in &kept {
            log.append(r)?;
        }
        Ok(log)
    }

    /// Appends a row.
    pub fn append(&self, r: &LogRecord) -> Result<(), TrainError> {
        let mut obj = serde_json::Map::new();
        obj.insert("step".into(), r.step.into());
        obj.insert("epoch".into(), json_num(r.epoch));
        for (k, v) in &r.values {
            obj.insert(k.clone(), json_num(*v));
        }
        let line = serde_json::Value::Object(obj).to_string() + "\n";
        append(&self.jsonl, &line)?;
        let cells: Vec<String> = csv_columns()
            .iter()
            .map(|c| match c.as_str() {
                "step" => r.step.to_string(),
                "epoch" => format!("{:.4}", r.epoch),
                c => r.get(c).map(|v| format!("{v}")).unwrap_or_default(),
            })
            .collect();
        append(&self.csv, &(cells.join(",") + "\n"))
    }

    /// Every row logged so far.
    pub fn read(&self) -> Result<Vec<LogRecord>, TrainError> {
        read_jsonl(&self.jsonl)
    }
}

/// Reads a `metrics.jsonl`.
pub fn read_jsonl(path: &Path) -> Result<Vec<LogRecord>, TrainError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(path, e)),
    };
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| io(path, format!("line {}: {e}", i + 1)))?;
        let obj = v
            .as_object()
            .ok_or_else(|| io(path, format!("line {}: not an object", i + 1)))?;
        let mut values = BTreeMap::new();
        for (k, v) in obj {
            if k != "step" && k != "epoch" {
                values.insert(k.clone(), v.as_f64().unwrap_or(f64::NAN));
            }
        }
        out.push(LogRecord {
            step: obj.get("step").and_then(|s| s.as_u64()).unwrap_or(0) as usize,
            epoch: obj.get("epoch").and_then(|s| s.as_f64()).unwrap_or(0.0),
            values,
        });
    }
    Ok(out)
}

fn json_num(v: f64) -> serde_json::Value {
    serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

fn append(path: &Path, text: &str) -> Result<(), TrainError> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| io(path, e))
}
