//! Adapters in PEFT's on-disk format: `adapter_config.json` + `adapter_model.safetensors` with keys
//! `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` (`[r, in]`) and `lora_B.weight`
//! (`[out, r]`), with DoRA also `lora_magnitude_vector` (`[out]`), and switching, snapshotting and
//! loading adapters across a whole model.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use burn::tensor::{Tensor, backend::Backend};
use prefer_llama::{
    HostTensor, LinearLayer, LinearSite, LlamaModel, Projection, host::read,
    loader::SafetensorsSource, weights::WeightSource,
};
use safetensors::{Dtype, tensor::TensorView};

use crate::{
    config::LoraConfig,
    dora::DoraMagnitude,
    lora_linear::{LoraAdapter, LoraLinear},
};

/// A model whose projections carry LoRA adapters.
pub type LoraModel<B, L> = LlamaModel<B, LoraLinear<B, L>>;

/// Errors reading or writing adapters.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// An adapter tensor does not fit the model.
    #[error(
        "{path}: tensor `{name}` has shape {found:?}, but the model needs {expected:?} (an adapter made for another base model?)"
    )]
    Shape {
        /// The adapter file.
        path: PathBuf,
        /// The tensor key.
        name: String,
        /// Shape the model needs.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> AdapterError {
    AdapterError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// PEFT's key of a factor (`"A"` or `"B"`) at a site.
pub fn peft_key(site: &LinearSite, factor: &str) -> String {
    format!("base_model.model.{}.lora_{factor}.weight", site.hf_path())
}

/// PEFT's key of DoRA's magnitude vector at a site.
pub fn peft_magnitude_key(site: &LinearSite) -> String {
    format!("base_model.model.{}.lora_magnitude_vector", site.hf_path())
}

/// Activates the named adapter in every layer that has it (others run their base only), or
/// switches all adapters off with `None`.
pub fn set_active_adapter<B: Backend, L: LinearLayer<B>>(
    model: &mut LoraModel<B, L>,
    name: Option<&str>,
) {
    for (_, layer) in model.projections_mut() {
        layer.set_active(name);
    }
}

/// Copies adapter `from` to a frozen adapter `to` in every layer (e.g. the DPO reference), without
/// copying the base; `from` stays active.
pub fn snapshot_adapter<B: Backend, L: LinearLayer<B>>(
    model: &mut LoraModel<B, L>,
    from: &str,
    to: &str,
) {
    for (_, layer) in model.projections_mut() {
        if let Some(copy) = layer.adapter(from).map(LoraAdapter::frozen_copy) {
            layer.insert(to, copy);
            layer.set_active(Some(from));
        }
    }
}

/// Moves the frozen adapter `into` towards adapter `from` in every layer that has both:
/// `into ← α·from + (1 − α)·into` (TR-DPO's reference sync); the active adapter stays as it is.
pub fn mix_adapter<B: Backend, L: LinearLayer<B>>(
    model: &mut LoraModel<B, L>,
    from: &str,
    into: &str,
    alpha: f64,
) {
    for (_, layer) in model.projections_mut() {
        let (Some(f), Some(i)) = (
            layer.names.iter().position(|n| n == from),
            layer.names.iter().position(|n| n == into),
        ) else {
            continue;
        };
        layer.adapters[i] = layer.adapters[i].mixed_towards(&layer.adapters[f], alpha);
    }
}

/// Writes adapter `name` in PEFT's format into `dir` (created if needed). Each file is written to a
/// temporary name and renamed, so a reader never sees a half-written file.
pub fn save_peft<B: Backend, L: LinearLayer<B>>(
    model: &LoraModel<B, L>,
    name: &str,
    config: &LoraConfig,
    base_model: Option<&str>,
    dir: &Path,
) -> Result<(), AdapterError> {
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut projections = Vec::new();
    for (site, layer) in model.projections() {
        let Some(ad) = layer.adapter(name) else {
            continue;
        };
        // The config written must describe the tensors written.
        let rank = ad.a.dims()[1];
        if rank != config.r || (ad.scaling - config.scaling()).abs() > 1e-9 * ad.scaling.abs() {
            return Err(file_err(
                dir,
                format!(
                    "adapter `{name}` at `{}` has rank {rank} and scaling {}, but the config \
                     being written says r = {} and scaling {}",
                    site.hf_path(),
                    ad.scaling,
                    config.r,
                    config.scaling()
                ),
            ));
        }
        if !projections.contains(&site.projection) {
            projections.push(site.projection);
        }
        if ad.dora.is_some() != config.use_dora {
            return Err(file_err(
                dir,
                format!(
                    "adapter `{name}` at `{}` {} DoRA magnitude, but the config being written \
                     says use_dora = {}",
                    site.hf_path(),
                    if ad.dora.is_some() { "has a" } else { "has no" },
                    config.use_dora
                ),
            ));
        }
        // `(key, shape on disk, values)`: the factors transposed to PEFT's layout, the magnitude
        // as it is.
        let transposed = |key: String, t: Tensor<B, 2>| {
            let t = t.transpose();
            (key, t.dims().to_vec(), t)
        };
        let mut items = vec![
            transposed(peft_key(&site, "A"), ad.a.val()),
            transposed(peft_key(&site, "B"), ad.b.val()),
        ];
        if let Some(dora) = &ad.dora {
            let m = dora.magnitude.val();
            let out = m.dims()[0];
            items.push((peft_magnitude_key(&site), vec![out], m.reshape([1, out])));
        }
        for (key, shape, t) in items {
            // Every tensor is read before any file is written: a failed read leaves no adapter.
            let data: Vec<f32> = read(t, &key)
                .map_err(|e| file_err(dir, format!("{e}; no adapter file was written")))?;
            tensors.push((
                key,
                shape,
                data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ));
        }
    }
    if tensors.is_empty() {
        return Err(file_err(
            dir,
            format!("the model has no adapter named `{name}`"),
        ));
    }
    let listed = |p: &Projection| config.target_modules.contains(p);
    if !projections.iter().all(listed) || projections.len() != config.target_modules.len() {
        let names = |ps: &[Projection]| ps.iter().map(|p| p.hf_name()).collect::<Vec<_>>();
        return Err(file_err(
            dir,
            format!(
                "adapter `{name}` sits on {:?}, but the config being written lists \
                 target_modules {:?}",
                names(&projections),
                names(&config.target_modules)
            ),
        ));
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).expect("consistent view"),
            )
        })
        .collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| file_err(dir, e))?;
    write_atomic(&dir.join("adapter_model.safetensors"), &bytes)?;
    let json =
        serde_json::to_string_pretty(&config.to_peft_json(base_model)).expect("JSON of a config");
    write_atomic(&dir.join("adapter_config.json"), json.as_bytes())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AdapterError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| file_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| file_err(path, e))
}

/// One site's tensors, as PEFT stores them.
#[derive(Debug, Clone)]
pub struct SiteFactors {
    /// `lora_A.weight` `[r, in]`.
    pub a: HostTensor,
    /// `lora_B.weight` `[out, r]`.
    pub b: HostTensor,
    /// DoRA's `lora_magnitude_vector` `[out]` (with `use_dora` only).
    pub magnitude: Option<HostTensor>,
}

/// An adapter's tensors by site.
pub type AdapterFactors = HashMap<LinearSite, SiteFactors>;

/// Reads a PEFT adapter directory: its config and tensors by site.
pub fn read_peft(dir: &Path) -> Result<(LoraConfig, AdapterFactors), AdapterError> {
    let config_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| file_err(&config_path, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| file_err(&config_path, format!("invalid JSON: {e}")))?;
    let config = LoraConfig::from_peft_json(&json).map_err(|e| file_err(&config_path, e))?;
    let path = dir.join("adapter_model.safetensors");
    if !path.is_file() {
        return Err(file_err(
            &path,
            "missing (adapter_model.bin pickles are not read; save with safe_serialization)",
        ));
    }
    let mut source = SafetensorsSource::open(dir, std::slice::from_ref(&path))
        .map_err(|e| file_err(&path, e))?;
    let names: Vec<String> = source.names().map(str::to_owned).collect();
    let mut tensors: HashMap<(LinearSite, Part), HostTensor> = HashMap::new();
    for key in names {
        let (site, part) =
            parse_key(&key).ok_or_else(|| file_err(&path, format!("unexpected tensor `{key}`")))?;
        let t = source
            .take(&key)
            .map_err(|e| file_err(&path, e))?
            .expect("listed tensor");
        let rank = if part == Part::Magnitude { 1 } else { 2 };
        if t.shape.len() != rank {
            return Err(file_err(
                &path,
                format!("tensor `{key}` must be {rank}-D, found shape {:?}", t.shape),
            ));
        }
        tensors.insert((site, part), t);
    }
    let mut out = HashMap::new();
    let sites: Vec<LinearSite> = tensors.keys().map(|(s, _)| *s).collect();
    for site in sites {
        if out.contains_key(&site) {
            continue;
        }
        let mut take = |part: Part| tensors.remove(&(site, part));
        let (a, b, magnitude) = (take(Part::A), take(Part::B), take(Part::Magnitude));
        let missing = |part: Part| file_err(&path, format!("`{}` is missing", part.key(&site)));
        let a = a.ok_or_else(|| missing(Part::A))?;
        let b = b.ok_or_else(|| missing(Part::B))?;
        out.insert(site, SiteFactors { a, b, magnitude });
    }
    check_against_config(&path, &config, &out)?;
    Ok((config, out))
}

/// The safetensors file and `adapter_config.json` must agree: every tensor belongs to a module
/// that `target_modules` lists, and every factor has the config's rank. A disagreement is an error
/// naming the tensors, never tensors silently dropped or loaded beyond what the config says.
fn check_against_config(
    path: &Path,
    config: &LoraConfig,
    factors: &AdapterFactors,
) -> Result<(), AdapterError> {
    let mut sites: Vec<&LinearSite> = factors.keys().collect();
    sites.sort_by_key(|s| (s.layer, s.projection.hf_name()));
    let stray: Vec<String> = sites
        .iter()
        .filter(|s| !config.target_modules.contains(&s.projection))
        .flat_map(|s| [peft_key(s, "A"), peft_key(s, "B")])
        .collect();
    if !stray.is_empty() {
        let targets: Vec<&str> = config.target_modules.iter().map(|p| p.hf_name()).collect();
        let shown: Vec<String> = stray.iter().take(4).map(|k| format!("`{k}`")).collect();
        let more = match stray.len().saturating_sub(shown.len()) {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        return Err(file_err(
            path,
            format!(
                "{} tensors match no module of adapter_config.json's target_modules [{}]: {}{more}; \
                 the adapter's files disagree (list those modules in target_modules, or remove \
                 their tensors)",
                stray.len(),
                targets.join(", "),
                shown.join(", "),
            ),
        ));
    }
    if let Some(missing) = config
        .target_modules
        .iter()
        .find(|p| !sites.iter().any(|s| s.projection == **p))
    {
        return Err(file_err(
            path,
            format!(
                "adapter_config.json's target_modules lists `{}` but the file holds no tensor for \
                 it; the adapter's files disagree (remove it from target_modules, or save the \
                 adapter again)",
                missing.hf_name()
            ),
        ));
    }
    for site in sites {
        let SiteFactors { a, b, magnitude } = &factors[site];
        match (magnitude, config.use_dora) {
            (None, true) => {
                return Err(file_err(
                    path,
                    format!(
                        "adapter_config.json says use_dora but `{}` is missing; the adapter's \
                         files disagree",
                        peft_magnitude_key(site)
                    ),
                ));
            }
            (Some(_), false) => {
                return Err(file_err(
                    path,
                    format!(
                        "`{}` is a DoRA magnitude but adapter_config.json says use_dora = false; \
                         the adapter's files disagree (set use_dora, or save the adapter again)",
                        peft_magnitude_key(site)
                    ),
                ));
            }
            _ => {}
        }
        if let Some(m) = magnitude
            && m.shape != [b.shape[0]]
        {
            return Err(file_err(
                path,
                format!(
                    "tensor `{}` has shape {:?}, but `{}` needs [{}]; the adapter's files disagree",
                    peft_magnitude_key(site),
                    m.shape,
                    peft_key(site, "B"),
                    b.shape[0]
                ),
            ));
        }
        for (key, t, expected) in [
            (peft_key(site, "A"), a, vec![config.r, a.shape[1]]),
            (peft_key(site, "B"), b, vec![b.shape[0], config.r]),
        ] {
            if t.shape != expected {
                return Err(file_err(
                    path,
                    format!(
                        "tensor `{key}` has shape {:?}, but adapter_config.json's r = {} needs \
                         {expected:?}; the adapter's files disagree",
                        t.shape, config.r
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Which tensor of a site a key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Part {
    A,
    B,
    Magnitude,
}

impl Part {
    fn key(self, site: &LinearSite) -> String {
        match self {
            Part::A => peft_key(site, "A"),
            Part::B => peft_key(site, "B"),
            Part::Magnitude => peft_magnitude_key(site),
        }
    }
}

fn parse_key(key: &str) -> Option<(LinearSite, Part)> {
    let rest = key.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, part) = rest.rsplit_once(".lora_")?;
    let part = match part {
        "A.weight" => Part::A,
        "B.weight" => Part::B,
        "magnitude_vector" => Part::Magnitude,
        _ => return None,
    };
    let projection = prefer_llama::Projection::ALL
        .into_iter()
        .find(|p| module == format!("{}.{}", p.hf_parent(), p.hf_name()))?;
    Some((
        LinearSite {
            layer: layer.parse().ok()?,
            projection,
        },
        part,
    ))
}

/// Loads a PEFT adapter directory into the model under `name` (trainable, and made active).
pub fn load_peft<B: Backend, L: LinearLayer<B>>(
    model: &mut LoraModel<B, L>,
    dir: &Path,
    name: &str,
) -> Result<LoraConfig, AdapterError> {
    let (config, mut factors) = read_peft(dir)?;
    let path = dir.join("adapter_model.safetensors");
    let device = model.embed_tokens.weight.device();
    let scaling = config.scaling();
    let n_layers = model.layers.len();
    for (site, layer) in model.projections_mut() {
        let Some(SiteFactors { a, b, magnitude }) = factors.remove(&site) else {
            continue;
        };
        let [d_out, d_in] = layer.base.dims();
        for (key, t, expected) in [
            (peft_key(&site, "A"), &a, vec![config.r, d_in]),
            (peft_key(&site, "B"), &b, vec![d_out, config.r]),
        ] {
            if t.shape != expected {
                return Err(AdapterError::Shape {
                    path: path.clone(),
                    name: key,
                    expected,
                    found: t.shape.clone(),
                });
            }
        }
        // The magnitude's shape was checked against B's, and B's against the base.
        let mut adapter = LoraAdapter::from_peft(&a, &b, scaling, &device);
        adapter.dora = magnitude.map(|m| DoraMagnitude::from_peft(&layer.base, &m, &device));
        layer.insert(name, adapter);
    }
    if let Some(site) = factors.keys().next() {
        return Err(file_err(
            &path,
            format!(
                "`{}` targets layer {} but the model has {n_layers} layers",
                peft_key(site, "A"),
                site.layer
            ),
        ));
    }
    set_active_adapter(model, Some(name));
    Ok(config)
}
