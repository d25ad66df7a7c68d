//! A training run as the user writes it: one flat table of keys (TOML, or `--key value` flags) under
//! TRL's, PEFT's and bitsandbytes' names. The run's inputs — model, data, adapter, reference model,
//! the bad-row policy — and the backend are this façade's concern; every other key is a DPO option
//! of [`TrainConfig`], which the trainer sees alone.

use std::path::PathBuf;

use prefer_dpo::{
    data::OnBadRow,
    train::{ConfigError, TrainConfig},
};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error as _, ser::Error as _};
use serde_json::{Map, Value};

use prefer_llama::hub_cache::RepoKind;

use crate::{
    backend::BackendKind,
    data_source::{data_files, locate},
    devices::Devices,
    trl_keys::{KeyError, Source, translate},
};

/// A training run: its inputs and backend, and the DPO options, read from and written to one flat
/// table. Unknown keys are rejected ([`RunConfig::keys`] lists the valid ones); an unknown value of
/// an option with fixed choices is an error listing them.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// The base model: a Hugging Face directory, a `.gguf` file, or a Hub id in the local Hugging
    /// Face cache (`model_name_or_path` in TRL's recipes).
    pub model: Option<PathBuf>,
    /// The revision of a Hub id `model`: a branch, tag or commit.
    pub model_revision: String,
    /// Training pairs (TRL standard/conversational/implicit or ShareGPT rows; JSON Lines, JSON or
    /// Parquet): a file, a dataset folder, or a Hub dataset id in the local Hugging Face cache
    /// (`dataset_name` in TRL's recipes).
    pub data: Option<PathBuf>,
    /// Held-out pairs, as `data`; without them a dataset's test split, else `eval_ratio` of
    /// `data`, is held out.
    pub eval_data: Option<PathBuf>,
    /// Fraction of `data` held out for evaluation when neither `eval_data` nor a test split is there.
    pub eval_ratio: f64,
    /// The config folder of a dataset with several.
    pub dataset_config: Option<String>,
    /// The split of a dataset folder or Hub id trained on.
    pub dataset_train_split: String,
    /// The split of a dataset folder or Hub id evaluated on, when it has one.
    pub dataset_test_split: String,
    /// A PEFT adapter to start from (and, by default, the reference).
    pub adapter: Option<PathBuf>,
    /// A separate reference model (its log-probs are computed once, before training).
    pub ref_model: Option<PathBuf>,
    /// `error` stops at the first bad row; `skip` skips and counts them.
    pub on_bad_row: OnBadRow,
    /// `flex` (the default), `ndarray`, `wgpu` or `cuda` (among those compiled in).
    pub backend: BackendKind,
    /// The devices this machine trains on, one replica of the model each (data parallelism).
    pub devices: Devices,
    /// Machines (processes) in the run, each with `devices` (accelerate's `num_machines`).
    pub num_machines: usize,
    /// This machine's rank, from 0 (accelerate's `machine_rank`).
    pub machine_rank: usize,
    /// Machine 0's address as the others reach it (accelerate's `main_process_ip`).
    pub main_process_ip: String,
    /// The port machine 0 listens on (accelerate's `main_process_port`).
    pub main_process_port: u16,
    /// The DPO options: loss, optimisation, LoRA, quantisation, lengths, logging and checkpoints.
    pub train: TrainConfig,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            model: None,
            model_revision: "main".into(),
            data: None,
            eval_data: None,
            eval_ratio: 0.1,
            dataset_config: None,
            dataset_train_split: "train".into(),
            dataset_test_split: "test".into(),
            adapter: None,
            ref_model: None,
            on_bad_row: OnBadRow::Error,
            backend: BackendKind::Flex,
            devices: Devices::default(),
            num_machines: 1,
            machine_rank: 0,
            main_process_ip: "127.0.0.1".into(),
            main_process_port: 29500,
            train: TrainConfig::default(),
        }
    }
}

/// The run's own keys, as the user writes them.
#[derive(Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RunKeys {
    model: Option<PathBuf>,
    model_revision: String,
    data: Option<PathBuf>,
    eval_data: Option<PathBuf>,
    eval_ratio: f64,
    dataset_config: Option<String>,
    dataset_train_split: String,
    dataset_test_split: String,
    adapter: Option<PathBuf>,
    ref_model: Option<PathBuf>,
    on_bad_row: OnBadRow,
    backend: BackendKind,
    devices: Devices,
    num_machines: usize,
    machine_rank: usize,
    main_process_ip: String,
    main_process_port: u16,
}

impl Default for RunKeys {
    fn default() -> Self {
        let d = RunConfig::default();
        Self {
            model: d.model,
            model_revision: d.model_revision,
            data: d.data,
            eval_data: d.eval_data,
            eval_ratio: d.eval_ratio,
            dataset_config: d.dataset_config,
            dataset_train_split: d.dataset_train_split,
            dataset_test_split: d.dataset_test_split,
            adapter: d.adapter,
            ref_model: d.ref_model,
            on_bad_row: d.on_bad_row,
            backend: d.backend,
            devices: d.devices,
            num_machines: d.num_machines,
            machine_rank: d.machine_rank,
            main_process_ip: d.main_process_ip,
            main_process_port: d.main_process_port,
        }
    }
}

const RUN_KEYS: [&str; 17] = [
    "model",
    "model_revision",
    "data",
    "eval_data",
    "eval_ratio",
    "dataset_config",
    "dataset_train_split",
    "dataset_test_split",
    "adapter",
    "ref_model",
    "on_bad_row",
    "backend",
    "devices",
    "num_machines",
    "machine_rank",
    "main_process_ip",
    "main_process_port",
];

fn bad(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

impl RunConfig {
    /// Every valid key: the run's, then the DPO options'.
    pub fn keys() -> Vec<String> {
        let mut keys: Vec<String> = RUN_KEYS.iter().map(|k| k.to_string()).collect();
        keys.extend(TrainConfig::keys());
        keys
    }

    /// Checks every option before any work starts; the error names the option.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.train.validate()?;
        if !(0.0..1.0).contains(&self.eval_ratio) {
            return Err(bad("eval_ratio", "must be in [0, 1)"));
        }
        if self.devices.is_empty() {
            return Err(bad("devices", "must name at least one device"));
        }
        if self.num_machines == 0 || self.machine_rank >= self.num_machines {
            return Err(bad(
                "machine_rank",
                format!(
                    "{} is not a machine of num_machines = {} (ranks run from 0)",
                    self.machine_rank, self.num_machines
                ),
            ));
        }
        // A model that is not on disk may be a Hub id in the local cache.
        if let Some(m) = &self.model {
            locate(m, RepoKind::Model, &self.model_revision).map_err(|e| bad("model", e))?;
        }
        for (key, path, split) in [
            ("data", &self.data, &self.dataset_train_split),
            ("eval_data", &self.eval_data, &self.dataset_test_split),
        ] {
            if let Some(p) = path {
                data_files(p, self.dataset_config.as_deref(), split).map_err(|e| bad(key, e))?;
            }
        }
        for (key, path) in [("adapter", &self.adapter), ("ref_model", &self.ref_model)] {
            if let Some(p) = path
                && !p.exists()
            {
                return Err(bad(
                    key,
                    format!("{}: no such file or directory", p.display()),
                ));
            }
        }
        if !self.train.method.uses_reference() && self.ref_model.is_some() {
            return Err(bad(
                "ref_model",
                format!(
                    "method {} uses no reference model: remove ref_model",
                    self.train.method
                ),
            ));
        }
        if self.train.sync_ref_model && self.ref_model.is_some() {
            return Err(bad(
                "sync_ref_model",
                "TR-DPO moves the starting adapter (the reference) towards the policy; a separate \
                 ref_model is precomputed and cannot follow it: remove ref_model",
            ));
        }
        Ok(())
    }

    fn run_keys(&self) -> RunKeys {
        RunKeys {
            model: self.model.clone(),
            model_revision: self.model_revision.clone(),
            data: self.data.clone(),
            eval_data: self.eval_data.clone(),
            eval_ratio: self.eval_ratio,
            dataset_config: self.dataset_config.clone(),
            dataset_train_split: self.dataset_train_split.clone(),
            dataset_test_split: self.dataset_test_split.clone(),
            adapter: self.adapter.clone(),
            ref_model: self.ref_model.clone(),
            on_bad_row: self.on_bad_row,
            backend: self.backend,
            devices: self.devices.clone(),
            num_machines: self.num_machines,
            machine_rank: self.machine_rank,
            main_process_ip: self.main_process_ip.clone(),
            main_process_port: self.main_process_port,
        }
    }
}

/// A config read from a table of prefer's and TRL's keys, with one warning line for each key set to
/// something that changes nothing here.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The run.
    pub config: RunConfig,
    /// Keys accepted without effect, one line each.
    pub warnings: Vec<String>,
}

impl RunConfig {
    /// Reads a table of prefer's keys and TRL's ([`crate::trl_keys`]): each TRL key is taken with
    /// TRL's meaning, renamed, accepted with a warning because it changes nothing here, or refused
    /// with what prefer offers instead; what the table leaves out takes `source`'s defaults. The
    /// error names the key.
    pub fn from_table(table: Map<String, Value>, source: Source) -> Result<Loaded, KeyError> {
        let translated = translate(table, source, &Self::keys_and_nullability())?;
        let config =
            from_map::<RunConfig>(translated.table).map_err(|(key, message)| KeyError {
                key: key.unwrap_or_default(),
                message,
            })?;
        Ok(Loaded {
            config,
            warnings: translated.warnings,
        })
    }

    /// Every key, and whether it takes null (unset) as a value.
    pub fn keys_and_nullability() -> Vec<(String, bool)> {
        Self::keys()
            .into_iter()
            .map(|k| {
                let null = Map::from_iter([(k.clone(), Value::Null)]);
                let nullable = serde_json::from_value::<RunConfig>(Value::Object(null)).is_ok();
                (k, nullable)
            })
            .collect()
    }
}

/// Deserialises `T` from `map`; on failure, names the first key whose value alone fails.
fn from_map<T: serde::de::DeserializeOwned>(
    map: Map<String, Value>,
) -> Result<T, (Option<String>, String)> {
    serde_json::from_value::<T>(Value::Object(map.clone())).map_err(|e| {
        let culprit = map.iter().find(|(k, v)| {
            let one = Map::from_iter([(k.to_string(), (*v).clone())]);
            serde_json::from_value::<T>(Value::Object(one)).is_err()
        });
        (culprit.map(|(k, _)| k.clone()), e.to_string())
    })
}

/// `from_map`'s error as one message.
fn named((key, message): (Option<String>, String)) -> String {
    match key {
        Some(key) => format!("`{key}`: {message}"),
        None => message,
    }
}

impl<'de> Deserialize<'de> for RunConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut map = Map::<String, Value>::deserialize(d)?;
        let own: Map<String, Value> = RUN_KEYS
            .iter()
            .filter_map(|k| map.remove(*k).map(|v| (k.to_string(), v)))
            .collect();
        let run: RunKeys = from_map(own).map_err(|e| D::Error::custom(named(e)))?;
        let train: TrainConfig = from_map(map).map_err(|e| D::Error::custom(named(e)))?;
        Ok(Self {
            model: run.model,
            model_revision: run.model_revision,
            data: run.data,
            eval_data: run.eval_data,
            eval_ratio: run.eval_ratio,
            dataset_config: run.dataset_config,
            dataset_train_split: run.dataset_train_split,
            dataset_test_split: run.dataset_test_split,
            adapter: run.adapter,
            ref_model: run.ref_model,
            on_bad_row: run.on_bad_row,
            backend: run.backend,
            devices: run.devices,
            num_machines: run.num_machines,
            machine_rank: run.machine_rank,
            main_process_ip: run.main_process_ip,
            main_process_port: run.main_process_port,
            train,
        })
    }
}

impl Serialize for RunConfig {
    /// One flat table, the run's keys first; unset options are left out.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = Map::new();
        for part in [
            serde_json::to_value(self.run_keys()),
            serde_json::to_value(&self.train),
        ] {
            match part.map_err(S::Error::custom)? {
                Value::Object(m) => map.extend(m.into_iter().filter(|(_, v)| !v.is_null())),
                _ => return Err(S::Error::custom("a config serialises to a table")),
            }
        }
        map.serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: Value) -> Result<RunConfig, String> {
        serde_json::from_value(json).map_err(|e| e.to_string())
    }

    #[test]
    fn one_flat_table_splits_into_the_run_and_the_dpo_options() {
        let c = parse(serde_json::json!({
            "model": "m", "backend": "ndarray", "on_bad_row": "skip",
            "beta": 0.2, "truncation_mode": "keep_end", "output_dir": "out",
        }))
        .unwrap();
        assert_eq!(c.model, Some(PathBuf::from("m")));
        assert_eq!(c.backend, BackendKind::Ndarray);
        assert_eq!(c.on_bad_row, OnBadRow::Skip);
        assert_eq!(c.train.beta, 0.2);
        assert_eq!(c.train.output_dir, PathBuf::from("out"));
        // Written back flat, read back the same.
        let back = parse(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert_eq!(RunConfig::default().backend.name(), "flex");
        let keys = RunConfig::keys();
        assert!(keys.contains(&"backend".to_string()) && keys.contains(&"beta".to_string()));
    }

    #[test]
    fn unknown_values_and_keys_are_errors_listing_the_choices() {
        for (key, value, choices) in [
            ("on_bad_row", "ignore", &["error", "skip"][..]),
            ("backend", "metal", &["ndarray", "flex", "wgpu", "cuda"]),
            ("truncation_mode", "middle", &["keep_start", "keep_end"]),
            ("bnb_4bit_quant_type", "int4", &["nf4", "fp4"]),
            ("bnb_4bit_compute_dtype", "float8", &["float32", "bfloat16"]),
        ] {
            let err = parse(serde_json::json!({ key: value })).unwrap_err();
            assert!(
                err.contains(&format!("`{key}`"))
                    && err.contains(&format!("unknown variant `{value}`"))
                    && choices.iter().all(|c| err.contains(&format!("`{c}`"))),
                "{key}: {err}"
            );
        }
        let err = parse(serde_json::json!({ "bta": 0.1 })).unwrap_err();
        assert!(err.contains("unknown field `bta`"), "{err}");
    }

    #[test]
    fn paths_are_checked_with_the_dpo_options() {
        let c = RunConfig {
            data: Some("/no/such/file.jsonl".into()),
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().key, "data");
        let c = RunConfig {
            train: TrainConfig {
                beta: 0.0,
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().key, "beta");
    }
}
