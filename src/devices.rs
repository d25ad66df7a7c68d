//! `devices`: how many replicas of the model a run trains on (data parallelism), as a count on the
//! chosen backend or a list — `cuda:0,cuda:1`, `wgpu:0,wgpu:1`, or `cpu,cpu` (replicas sharing
//! the CPU, for testing the data-parallel path without accelerators).

use std::fmt;

use burn::tensor::backend::{DeviceId, DeviceOps};
use serde::{Deserialize, Serialize};

use crate::backend::BackendKind;

/// The devices of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Devices {
    /// This many: the backend's default device for 1; GPUs 0.. (or replicas on the CPU) beyond.
    Count(usize),
    /// Comma-separated `backend:index` names (`cpu` on the CPU backends).
    List(String),
}

impl Default for Devices {
    fn default() -> Self {
        Self::Count(1)
    }
}

impl fmt::Display for Devices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Count(n) => write!(f, "{n}"),
            Self::List(list) => f.write_str(list),
        }
    }
}

impl Devices {
    /// How many replicas.
    pub fn len(&self) -> usize {
        match self {
            Self::Count(n) => *n,
            Self::List(list) => list.split(',').count(),
        }
    }

    /// Whether no device is named (refused by [`Devices::resolve`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The devices on backend `kind`, whose default device is `default`; an error names the entry
    /// that does not fit the backend.
    pub fn resolve<D: DeviceOps>(&self, kind: BackendKind, default: &D) -> Result<Vec<D>, String> {
        let gpu = |index: usize| D::from_id(DeviceId::new(0, index as u16));
        match self {
            Self::Count(0) => Err("devices: must be at least 1".into()),
            Self::Count(1) => Ok(vec![default.clone()]),
            Self::Count(n) if kind.is_cpu() => Ok(vec![default.clone(); *n]),
            Self::Count(n) => Ok((0..*n).map(gpu).collect()),
            Self::List(list) => list
                .split(',')
                .map(|entry| {
                    let entry = entry.trim();
                    let expected = if kind.is_cpu() { "cpu" } else { kind.name() };
                    match entry.split_once(':') {
                        None if entry == "cpu" && kind.is_cpu() => Ok(default.clone()),
                        Some((name, index)) if name == expected && !kind.is_cpu() => index
                            .parse::<usize>()
                            .map(gpu)
                            .map_err(|_| format!("devices: `{entry}`: the index is not a number")),
                        _ => Err(format!(
                            "devices: `{entry}` is not a device of backend {kind} (write {})",
                            if kind.is_cpu() {
                                "`cpu` once per replica".to_string()
                            } else {
                                format!("`{expected}:0`, `{expected}:1`, …")
                            }
                        )),
                    }
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::ndarray::NdArrayDevice;

    use super::*;

    #[test]
    fn counts_and_lists_become_devices_of_the_backend() {
        let cpu = NdArrayDevice::default();
        let resolve = |d: Devices, kind| d.resolve(kind, &cpu);
        assert_eq!(
            resolve(Devices::Count(2), BackendKind::Ndarray)
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            resolve(Devices::List("cpu, cpu,cpu".into()), BackendKind::Ndarray)
                .unwrap()
                .len(),
            3
        );
        let err = resolve(Devices::List("cpu,cuda:1".into()), BackendKind::Ndarray).unwrap_err();
        assert!(
            err.contains("`cuda:1` is not a device of backend ndarray"),
            "{err}"
        );
        let err = resolve(Devices::List("wgpu:x".into()), BackendKind::Wgpu).unwrap_err();
        assert!(err.contains("not a number"), "{err}");
        assert!(resolve(Devices::Count(0), BackendKind::Ndarray).is_err());
        let parsed: Devices = toml::from_str::<toml::Table>("devices = \"cuda:0,cuda:1\"").unwrap()
            ["devices"]
            .clone()
            .try_into()
            .unwrap();
        assert_eq!(parsed.len(), 2);
    }
}
