//! Checkpoints that survive a crash: `checkpoint-N/` holds the adapter in PEFT's format, the frozen
//! reference adapter, the AdamW state and `trainer_state.json` (steps, data position, scheduler,
//! early-stopping state). Everything is written into a hidden temporary directory that is renamed
//! into place last, so a reader sees either the previous checkpoint or the whole new one.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use burn::optim::Optimizer;

use burn::{
    module::ParamId,
    optim::{AdamW, adaptor::OptimizerAdaptor},
    record::{BinFileRecorder, FullPrecisionSettings, Recorder},
    tensor::backend::AutodiffBackend,
};
use prefer_llama::LinearLayer;
use prefer_lora::{LoraConfig, LoraLinear, load_peft, peft_key, peft_magnitude_key, save_peft};
use serde::{Deserialize, Serialize};

use super::{Fingerprint, TrainError, plateau::Plateau, step::DpoPolicy};

/// Name of the trainable adapter inside the model.
pub const POLICY_ADAPTER: &str = "default";
/// Name of the frozen reference snapshot inside the model.
pub const REFERENCE_ADAPTER: &str = "reference";

/// Where training stands: enough to continue exactly where it stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimiser steps taken (the scheduler's position too).
    pub global_step: usize,
    /// Epoch of the next micro-batch.
    pub epoch: usize,
    /// Micro-batches of that epoch already used.
    pub batch_in_epoch: usize,
    /// Optimiser steps of the whole run.
    pub total_steps: usize,
    /// The seed everything random derives from (data order per epoch, dropout per step).
    pub seed: u64,
    /// Best value of `metric_for_best_model` so far.
    pub best_metric: Option<f64>,
    /// Evaluations since it last improved.
    pub evals_without_improvement: usize,
    /// The checkpoint with the best `metric_for_best_model` so far (its step) and that value, kept
    /// for `load_best_model_at_end` and `save_strategy = "best"` (transformers'
    /// `best_model_checkpoint`); absent in checkpoints written before they existed.
    #[serde(default)]
    pub best_model: Option<BestModel>,
    /// Where `reduce_lr_on_plateau` stands (with that schedule only).
    #[serde(default)]
    pub plateau: Option<Plateau>,
    /// Pairs per micro-batch over all replicas when saved, so that a run resumed on another
    /// number of devices finds its place in the epoch (absent in older checkpoints: the resumed
    /// run's own).
    #[serde(default)]
    pub pairs_per_batch: Option<usize>,
    /// Pairs per optimiser step over all replicas (a resume must keep it: steps, the schedule
    /// and the logs count optimiser steps).
    #[serde(default)]
    pub pairs_per_step: Option<usize>,
}

/// The best checkpoint so far.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BestModel {
    /// Its optimiser step (`checkpoint-<step>`).
    pub step: usize,
    /// Its value of `metric_for_best_model`.
    pub value: f64,
}

/// The optimiser the trainer uses.
pub type DpoOptimizer<B, L> = OptimizerAdaptor<AdamW, DpoPolicy<B, L>, B>;
type OptimRecord<B, L> = <DpoOptimizer<B, L> as Optimizer<DpoPolicy<B, L>, B>>::Record;

/// Stable names of the trainable tensors (factors, and DoRA's magnitudes): PEFT's keys. Parameter ids are random per process, so
/// the optimiser state is saved under ids derived from these names.
fn stable_ids<B: AutodiffBackend, L: LinearLayer<B>>(
    policy: &DpoPolicy<B, L>,
) -> Vec<(ParamId, ParamId)>
where
    LoraLinear<B, L>: LinearLayer<B>,
{
    let mut out = Vec::new();
    for (site, layer) in policy.model.projections() {
        if let Some(ad) = layer.adapter(POLICY_ADAPTER) {
            let magnitude = ad
                .dora
                .as_ref()
                .map(|d| (peft_magnitude_key(&site), d.magnitude.id));
            let factors = [
                (peft_key(&site, "A"), ad.a.id),
                (peft_key(&site, "B"), ad.b.id),
            ];
            for (key, id) in factors.into_iter().chain(magnitude) {
                let stable = Fingerprint::default().str(&key).0;
                out.push((id, ParamId::from(stable)));
            }
        }
    }
    out
}

fn io(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Writes `checkpoint-{global_step}` under `out` atomically and removes the oldest ones beyond
/// `keep`, never the best one (`state.best_model`): with it, `keep` counts it too but the newest
/// always stays, as transformers rotates. Returns the checkpoint's path.
#[allow(clippy::too_many_arguments)]
pub fn save_checkpoint<B: AutodiffBackend, L: LinearLayer<B>>(
    out: &Path,
    policy: &DpoPolicy<B, L>,
    optim: &DpoOptimizer<B, L>,
    state: &TrainerState,
    lora: &LoraConfig,
    base_model: Option<&str>,
    keep: Option<usize>,
) -> Result<PathBuf, TrainError>
where
    LoraLinear<B, L>: LinearLayer<B>,
    DpoPolicy<B, L>: burn::module::AutodiffModule<B>,
{
    let step = state.global_step;
    let tmp = out.join(format!(".checkpoint-{step}.tmp{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    save_peft(
        &policy.model,
        POLICY_ADAPTER,
        lora,
        base_model,
        &tmp.join("adapter"),
    )?;
    if policy.reference.as_deref() == Some(REFERENCE_ADAPTER) {
        save_peft(
            &policy.model,
            REFERENCE_ADAPTER,
            lora,
            base_model,
            &tmp.join("reference"),
        )?;
    }
    let to_stable: HashMap<ParamId, ParamId> = stable_ids(policy).into_iter().collect();
    let record: OptimRecord<B, L> = optim
        .to_record()
        .into_iter()
        .filter_map(|(id, r)| to_stable.get(&id).map(|s| (*s, r)))
        .collect();
    let path = tmp.join("optimizer");
    BinFileRecorder::<FullPrecisionSettings>::new()
        .record(record, path.clone())
        .map_err(|e| io(&path, format!("{e:?}")))?;
    let json = serde_json::to_vec_pretty(state).map_err(|e| io(&tmp, e))?;
    std::fs::write(tmp.join("trainer_state.json"), json).map_err(|e| io(&tmp, e))?;

    let dir = out.join(format!("checkpoint-{step}"));
    if dir.exists() {
        let old = out.join(format!(".checkpoint-{step}.old{}", std::process::id()));
        std::fs::rename(&dir, &old).map_err(|e| io(&dir, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| io(&old, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| io(&dir, e))?;
    if let Some(keep) = keep {
        rotate_checkpoints(out, keep, state.best_model.map(|b| b.step))?;
    }
    Ok(dir)
}

/// Removes the oldest checkpoints beyond `keep`, sparing `best` (and always the newest).
fn rotate_checkpoints(out: &Path, keep: usize, best: Option<usize>) -> Result<(), TrainError> {
    let all = list_checkpoints(out);
    let has_best = best.is_some_and(|b| all.iter().any(|(s, _)| *s == b));
    let others: Vec<&PathBuf> = all
        .iter()
        .filter(|(s, _)| Some(*s) != best)
        .map(|(_, p)| p)
        .collect();
    let room = if has_best {
        keep.saturating_sub(1).max(1)
    } else {
        keep
    };
    for old in others.iter().take(others.len().saturating_sub(room)) {
        std::fs::remove_dir_all(old).map_err(|e| io(old, e))?;
    }
    Ok(())
}

/// Complete checkpoints under `out`, oldest first.
pub fn list_checkpoints(out: &Path) -> Vec<(usize, PathBuf)> {
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(out)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
                    e.path()
                        .join("trainer_state.json")
                        .is_file()
                        .then(|| (step, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// The newest complete checkpoint under `out`.
pub fn latest_checkpoint(out: &Path) -> Option<PathBuf> {
    list_checkpoints(out).pop().map(|(_, p)| p)
}

/// Restores adapter(s), optimiser state and trainer state from `dir`.
pub fn load_checkpoint<B: AutodiffBackend, L: LinearLayer<B>>(
    dir: &Path,
    policy: &mut DpoPolicy<B, L>,
    optim: DpoOptimizer<B, L>,
) -> Result<(DpoOptimizer<B, L>, TrainerState), TrainError>
where
    LoraLinear<B, L>: LinearLayer<B>,
    DpoPolicy<B, L>: burn::module::AutodiffModule<B>,
{
    let state_path = dir.join("trainer_state.json");
    let bytes = std::fs::read(&state_path).map_err(|e| io(&state_path, e))?;
    let state: TrainerState = serde_json::from_slice(&bytes).map_err(|e| io(&state_path, e))?;
    if policy.reference.as_deref() == Some(REFERENCE_ADAPTER) {
        let reference = dir.join("reference");
        if reference.is_dir() {
            load_peft(&mut policy.model, &reference, REFERENCE_ADAPTER)?;
            freeze_reference(policy);
        }
    }
    load_peft(&mut policy.model, &dir.join("adapter"), POLICY_ADAPTER)?;
    let from_stable: HashMap<ParamId, ParamId> = stable_ids(policy)
        .into_iter()
        .map(|(id, s)| (s, id))
        .collect();
    let path = dir.join("optimizer");
    let device = policy.model.embed_tokens.weight.device();
    let record: OptimRecord<B, L> = BinFileRecorder::<FullPrecisionSettings>::new()
        .load(path.clone(), &device)
        .map_err(|e| io(&path, format!("{e:?}")))?;
    let record: OptimRecord<B, L> = record
        .into_iter()
        .filter_map(|(s, r)| from_stable.get(&s).map(|id| (*id, r)))
        .collect();
    Ok((Optimizer::load_record(optim, record), state))
}

/// Makes the reference adapter's factors constants (a PEFT load makes them trainable).
pub fn freeze_reference<B: AutodiffBackend, L: LinearLayer<B>>(policy: &mut DpoPolicy<B, L>)
where
    LoraLinear<B, L>: LinearLayer<B>,
{
    for (_, layer) in policy.model.projections_mut() {
        if let Some(i) = layer.names.iter().position(|n| n == REFERENCE_ADAPTER) {
            layer.adapters[i] = layer.adapters[i].frozen_copy();
        }
    }
}
