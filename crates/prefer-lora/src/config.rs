//! LoRA hyper-parameters under PEFT's `LoraConfig` names, read from and written to
//! `adapter_config.json`.

use prefer_llama::Projection;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a LoRA adapter adds, and where.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank of the update.
    pub r: usize,
    /// Numerator of the scaling (`lora_alpha / r`, or `/ √r` with rsLoRA).
    pub lora_alpha: f64,
    /// Dropout on the adapter's input during training.
    pub lora_dropout: f64,
    /// The projections that get an adapter.
    pub target_modules: Vec<Projection>,
    /// Rank-stabilised scaling `alpha / √r`.
    pub use_rslora: bool,
    /// DoRA: a trained magnitude per output row on top of the low-rank update.
    pub use_dora: bool,
}

impl Default for LoraConfig {
    /// PEFT's defaults (r 8, alpha 8, no dropout) on every projection.
    fn default() -> Self {
        Self {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: Projection::ALL.to_vec(),
            use_rslora: false,
            use_dora: false,
        }
    }
}

/// A configuration PEFT could not have written, or that prefer cannot apply.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl LoraConfig {
    /// The factor applied to `B·A·x`.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Parses `target_modules` as PEFT accepts it: a list of module names, or `all-linear`.
    pub fn parse_targets<S: AsRef<str>>(names: &[S]) -> Result<Vec<Projection>, ConfigError> {
        let mut out = Vec::new();
        for name in names {
            let name = name.as_ref();
            if name == "all-linear" {
                return Ok(Projection::ALL.to_vec());
            }
            let p = Projection::ALL.into_iter().find(|p| p.hf_name() == name).ok_or_else(|| {
                ConfigError(format!(
                    "unknown target module `{name}` (valid: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, all-linear)"
                ))
            })?;
            if !out.contains(&p) {
                out.push(p);
            }
        }
        if out.is_empty() {
            return Err(ConfigError("target_modules is empty".into()));
        }
        Ok(out)
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.r == 0 {
            return Err(ConfigError("r must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(ConfigError(format!(
                "lora_dropout must be in [0, 1) (got {})",
                self.lora_dropout
            )));
        }
        if !self.lora_alpha.is_finite() {
            return Err(ConfigError("lora_alpha must be finite".into()));
        }
        Ok(())
    }

    /// Reads PEFT's `adapter_config.json` contents.
    pub fn from_peft_json(v: &Value) -> Result<Self, ConfigError> {
        let peft: PeftAdapterConfig = serde_json::from_value(v.clone())
            .map_err(|e| ConfigError(format!("invalid adapter_config.json: {e}")))?;
        if peft.peft_type.as_deref().is_some_and(|t| t != "LORA") {
            return Err(ConfigError(format!(
                "peft_type `{}` is not LORA",
                peft.peft_type.unwrap_or_default()
            )));
        }
        if peft.bias.as_deref().is_some_and(|b| b != "none") {
            return Err(ConfigError(format!(
                "bias = `{}` is not supported (only \"none\")",
                peft.bias.unwrap_or_default()
            )));
        }
        if peft.fan_in_fan_out {
            return Err(ConfigError(
                "fan_in_fan_out adapters are not supported".into(),
            ));
        }
        let targets = match peft.target_modules {
            Value::String(s) => Self::parse_targets(&[s])?,
            Value::Array(a) => {
                let names: Vec<String> = a
                    .iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect();
                Self::parse_targets(&names)?
            }
            _ => {
                return Err(ConfigError(
                    "target_modules must be a list of names or \"all-linear\"".into(),
                ));
            }
        };
        let config = Self {
            r: peft.r,
            lora_alpha: peft.lora_alpha,
            lora_dropout: peft.lora_dropout,
            target_modules: targets,
            use_rslora: peft.use_rslora,
            use_dora: peft.use_dora,
        };
        config.validate()?;
        Ok(config)
    }

    /// PEFT's `adapter_config.json` contents for this adapter.
    pub fn to_peft_json(&self, base_model_name_or_path: Option<&str>) -> Value {
        let targets: Vec<&str> = self.target_modules.iter().map(|p| p.hf_name()).collect();
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": targets,
            "use_rslora": self.use_rslora,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "use_dora": self.use_dora,
            "inference_mode": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "rank_pattern": {},
            "alpha_pattern": {},
        })
    }
}

#[derive(Deserialize, Serialize)]
struct PeftAdapterConfig {
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: Value,
    #[serde(default)]
    use_rslora: bool,
    bias: Option<String>,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_target_lists_the_valid_names() {
        let e = LoraConfig::parse_targets(&["q_proj", "qkv"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "unknown target module `qkv` (valid: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, all-linear)"
        );
        assert_eq!(LoraConfig::parse_targets(&["all-linear"]).unwrap().len(), 7);
    }

    #[test]
    fn scaling_plain_and_rslora() {
        let mut c = LoraConfig {
            r: 16,
            lora_alpha: 32.0,
            ..Default::default()
        };
        assert_eq!(c.scaling(), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scaling(), 8.0);
    }

    #[test]
    fn peft_json_round_trip() {
        let c = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.05,
            target_modules: vec![Projection::Q, Projection::V],
            use_rslora: true,
            use_dora: false,
        };
        assert_eq!(
            LoraConfig::from_peft_json(&c.to_peft_json(None)).unwrap(),
            c
        );
        let dora = LoraConfig {
            use_dora: true,
            ..c
        };
        assert_eq!(
            LoraConfig::from_peft_json(&dora.to_peft_json(None)).unwrap(),
            dora
        );
    }
}
