//! The training loop: micro-batches through `TrainStep`, gradients averaged over
//! `gradient_accumulation_steps` and clipped by their global norm, one AdamW step and one scheduler
//! step per optimiser step, and logging, evaluation, checkpoints and early stopping counted in
//! optimiser steps — TRL's semantics, which burn-train's `SupervisedTraining` loop does not have
//! (it steps the rate per micro-batch, sums accumulated gradients, clips per tensor and checkpoints
//! per epoch only), so the loop is here and the model plugs into burn-train through its step traits.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use burn::{
    module::AutodiffModule,
    optim::{AdamWConfig, GradientsAccumulator},
    tensor::{Tensor, backend::AutodiffBackend},
    train::{InferenceStep, TrainStep},
};
use prefer_kernels::PreferBackend;
use prefer_llama::{LinearLayer, LlamaModel};
use prefer_lora::{LoraLinear, snapshot_adapter};
use rand::{SeedableRng, seq::SliceRandom};

use super::{
    TrainError,
    checkpoint::{
        DpoOptimizer, POLICY_ADAPTER, REFERENCE_ADAPTER, TrainerState, latest_checkpoint,
        load_checkpoint, save_checkpoint,
    },
    clip::average_and_clip,
    config::TrainConfig,
    metrics_log::{LogRecord, MetricsLog},
    reference::{Fingerprint, RefLogps, cache_dir, compute_ref_logps, read_cached, write_cached},
    schedule::LrSchedule,
    step::{DpoInput, DpoOutput, DpoPolicy},
};
use crate::{
    data::{TokenizedPair, collate},
    metrics::PairRecords,
};

/// Where the reference log-probs come from.
#[derive(Debug, Clone)]
pub enum ReferenceSource {
    /// The starting adapter, frozen, over the same base (TRL with a PEFT model and no `ref_model`);
    /// with a fresh adapter this equals the base.
    Snapshot,
    /// The bare base: adapters switched off.
    BaseModel,
    /// Sums computed elsewhere (e.g. by a separate `ref_model`), per pair of `train` and `eval`.
    Precomputed {
        /// Per training pair.
        train: RefLogps,
        /// Per eval pair.
        eval: RefLogps,
    },
}

/// The data and context of a run.
#[derive(Debug, Clone)]
pub struct TrainRun {
    /// Training pairs.
    pub train: Vec<TokenizedPair>,
    /// Held-out pairs (may be empty).
    pub eval: Vec<TokenizedPair>,
    /// Padding id.
    pub pad_id: u32,
    /// The reference.
    pub reference: ReferenceSource,
    /// `base_model_name_or_path` written into the adapter config.
    pub base_model: Option<String>,
    /// Identifies the base model in the reference cache key.
    pub model_fingerprint: Fingerprint,
    /// Continue from this checkpoint directory, or from the output directory's latest.
    pub resume: Option<Resume>,
}

/// Which checkpoint to continue from.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// The newest complete checkpoint in the output directory.
    Latest,
    /// A given checkpoint directory.
    From(PathBuf),
}

/// Hooks for progress display; every method has a no-op default.
pub trait TrainObserver {
    /// Training starts at `step` of `total` optimiser steps.
    fn on_start(&mut self, _step: usize, _total: usize) {}
    /// An optimiser step finished.
    fn on_step(&mut self, _step: usize, _total: usize) {}
    /// A row of metrics was logged.
    fn on_log(&mut self, _record: &LogRecord) {}
    /// Something worth a line (a checkpoint written, the cache used, early stopping).
    fn on_message(&mut self, _message: &str) {}
}

/// An observer that shows nothing.
#[derive(Debug, Default)]
pub struct Silent;
impl TrainObserver for Silent {}

/// What a finished run produced.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Optimiser steps taken in total.
    pub steps: usize,
    /// The final adapter (PEFT format).
    pub adapter_dir: PathBuf,
    /// Every logged row.
    pub history: Vec<LogRecord>,
    /// The last evaluation, if any.
    pub final_eval: Option<LogRecord>,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// Wall-clock seconds of the loop.
    pub seconds: f64,
    /// The optimiser steps of this run (not counting those before a resume).
    pub throughput: Throughput,
}

/// Optimiser steps, their wall time and the tokens they trained on.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Throughput {
    /// Steps taken.
    pub steps: usize,
    /// Their wall time, from each step's first micro-batch to its parameter update (evaluation
    /// and checkpoints excluded).
    pub seconds: f64,
    /// Real tokens (prompts and completions, no padding).
    pub tokens: usize,
    /// Tokens the model computed (padding included when batches are padded).
    pub computed_tokens: usize,
}

impl Throughput {
    /// Seconds per optimiser step.
    pub fn seconds_per_step(&self) -> f64 {
        self.seconds / self.steps.max(1) as f64
    }

    /// Real tokens per second.
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
}

/// The policy as the trainer holds it.
pub type LoraLlama<B, L> = LlamaModel<B, LoraLinear<B, L>>;

fn mix(seed: u64, salt: u64) -> u64 {
    Fingerprint::default()
        .bytes(&seed.to_le_bytes())
        .bytes(&salt.to_le_bytes())
        .0
}

/// Trains the adapter named `default` of `model` with DPO as `config` says, writing the adapter,
/// checkpoints and metrics into `config.output_dir`.
///
/// `model` must carry a trainable adapter named `default` (the one [`prefer_lora::LoraFactory`] makes
/// when its `adapter_name` is `"default"`, or one loaded with `load_peft`).
pub fn train<B, L>(
    model: LoraLlama<B, L>,
    run: TrainRun,
    config: &TrainConfig,
    observer: &mut dyn TrainObserver,
) -> Result<TrainSummary, TrainError>
where
    B: AutodiffBackend + PreferBackend,
    B::InnerBackend: PreferBackend,
    L: LinearLayer<B> + AutodiffModule<B> + 'static,
    L::InnerModule: LinearLayer<B::InnerBackend> + burn::module::ModuleDisplay,
    LoraLinear<B, L>: LinearLayer<B>,
{
    config.validate()?;
    if run.train.is_empty() {
        return Err(TrainError::Data("no training pairs".into()));
    }
    let lora = config.lora()?;
    let mode = config.truncation()?;
    let out = config.output_dir.clone();
    std::fs::create_dir_all(&out).map_err(|e| TrainError::Checkpoint {
        path: out.clone(),
        message: e.to_string(),
    })?;
    let device = model.embed_tokens.weight.device();

    let mut model = model;
    if !model
        .projections()
        .iter()
        .any(|(_, l)| l.adapter(POLICY_ADAPTER).is_some())
    {
        return Err(TrainError::Data(format!(
            "the model has no adapter named `{POLICY_ADAPTER}` to train"
        )));
    }
    let reference = match &run.reference {
        ReferenceSource::Snapshot => {
            snapshot_adapter(&mut model, POLICY_ADAPTER, REFERENCE_ADAPTER);
            Some(REFERENCE_ADAPTER.to_string())
        }
        _ => None,
    };
    let mut policy = DpoPolicy {
        model,
        loss: config.loss(),
        reference,
    };

    // Precomputed reference log-probs: given, read from the cache, or computed now and cached.
    let precomputed: Option<(RefLogps, RefLogps)> = match &run.reference {
        ReferenceSource::Precomputed { train, eval } => {
            if train.len() != run.train.len() || eval.len() != run.eval.len() {
                return Err(TrainError::Data(format!(
                    "precomputed reference log-probs: {} train and {} eval values for {} and {} pairs",
                    train.len(),
                    eval.len(),
                    run.train.len(),
                    run.eval.len()
                )));
            }
            Some((train.clone(), eval.clone()))
        }
        _ if config.precompute_ref_log_probs => Some(precompute(&policy, &run, config, observer)?),
        _ => None,
    };

    // Steps.
    let bs = config.per_device_train_batch_size;
    let accum = config.gradient_accumulation_steps;
    let batches_per_epoch = run.train.len().div_ceil(bs);
    let steps_per_epoch = batches_per_epoch.div_ceil(accum);
    let total_steps = if config.max_steps > 0 {
        config.max_steps as usize
    } else {
        ((config.num_train_epochs * steps_per_epoch as f64).ceil() as usize).max(1)
    };
    let warmup = if config.warmup_steps > 0 {
        config.warmup_steps
    } else {
        (config.warmup_ratio * total_steps as f64).ceil() as usize
    };
    let mut schedule = LrSchedule {
        kind: config.lr_scheduler_type,
        peak: config.learning_rate,
        warmup,
        total: total_steps,
        step: 0,
    };
    let mut optim: DpoOptimizer<B, L> = AdamWConfig::new()
        .with_beta_1(config.adam_beta1 as f32)
        .with_beta_2(config.adam_beta2 as f32)
        .with_epsilon(config.adam_epsilon as f32)
        .with_weight_decay(config.weight_decay as f32)
        .init();
    let mut state = TrainerState {
        global_step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        total_steps,
        seed: config.seed,
        best_metric: None,
        evals_without_improvement: 0,
    };

    if let Some(resume) = &run.resume {
        let dir = match resume {
            Resume::From(d) => d.clone(),
            Resume::Latest => latest_checkpoint(&out).ok_or_else(|| TrainError::Checkpoint {
                path: out.clone(),
                message: "no checkpoint to resume from".into(),
            })?,
        };
        let (o, s) = load_checkpoint(&dir, &mut policy, optim)?;
        optim = o;
        if s.seed != config.seed {
            return Err(TrainError::Checkpoint {
                path: dir,
                message: format!(
                    "the checkpoint was trained with seed {} but the config says {}",
                    s.seed, config.seed
                ),
            });
        }
        state = TrainerState { total_steps, ..s };
        schedule.step = state.global_step;
        observer.on_message(&format!(
            "resumed from {} at step {}",
            dir.display(),
            state.global_step
        ));
    }
    // A process killed while writing a checkpoint leaves its temporary directory behind.
    if let Ok(entries) = std::fs::read_dir(&out) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(".checkpoint-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let log = MetricsLog::open(&out, state.global_step)?;
    let mut history = log.read()?;
    let mut last_checkpoint = latest_checkpoint(&out);

    let order = |epoch: usize| -> Vec<usize> {
        let mut idx: Vec<usize> = (0..run.train.len()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(mix(config.seed, epoch as u64));
        idx.shuffle(&mut rng);
        idx
    };
    let input_for = |ids: &[usize], pairs: &[TokenizedPair], refs: Option<&RefLogps>| {
        let picked: Vec<&TokenizedPair> = ids.iter().map(|&i| &pairs[i]).collect();
        let batch = collate(&picked, run.pad_id, config.max_length, mode)
            .to_device::<B>(&device, config.packing());
        let ref_logps = refs.map(|r| {
            let mut v: Vec<f32> = ids.iter().map(|&i| r[i].0).collect();
            v.extend(ids.iter().map(|&i| r[i].1));
            Tensor::<B, 1>::from_floats(v.as_slice(), &device)
        });
        DpoInput { batch, ref_logps }
    };

    if config.eval_on_start && state.global_step == 0 && !run.eval.is_empty() {
        let record = evaluate(&policy, &run, config, precomputed.as_ref(), 0, 0.0)?;
        log.append(&record)?;
        observer.on_log(&record);
        history.push(record);
    }
    observer.on_start(state.global_step, total_steps);
    let started = Instant::now();
    let mut epoch_order = order(state.epoch);
    let mut window = Window::default();
    let mut totals = Throughput::default();
    let mut final_eval = None;
    let mut stopped_early = false;
    let eval_every = config.eval_every();

    while state.global_step < total_steps {
        let step_started = Instant::now();
        if state.batch_in_epoch >= batches_per_epoch {
            state.epoch += 1;
            state.batch_in_epoch = 0;
            epoch_order = order(state.epoch);
        }
        // Dropout draws from the backend's generator: seeding it per step makes a resumed run draw
        // the same masks as an uninterrupted one.
        B::seed(
            &device,
            mix(config.seed, 1 << 32 | state.global_step as u64),
        );
        let group = accum.min(batches_per_epoch - state.batch_in_epoch);
        let mut accumulator = GradientsAccumulator::<DpoPolicy<B, L>>::new();
        let mut step_loss = 0.0;
        for g in 0..group {
            let b = state.batch_in_epoch + g;
            let ids = &epoch_order[b * bs..((b + 1) * bs).min(run.train.len())];
            let input = input_for(ids, &run.train, precomputed.as_ref().map(|p| &p.0));
            let output = TrainStep::step(&policy, input);
            accumulator.accumulate(&policy, output.grads);
            step_loss += output.item.loss / group as f64;
            totals.tokens += output.item.tokens;
            totals.computed_tokens += output.item.computed_tokens;
            window.add(&output.item);
        }
        let (grads, grad_norm) =
            average_and_clip(&policy, accumulator.grads(), group, config.max_grad_norm);
        let step = state.global_step + 1;
        for (metric, value) in [("loss", step_loss), ("grad_norm", grad_norm)] {
            if !value.is_finite() {
                return Err(TrainError::NonFinite {
                    step,
                    metric: metric.into(),
                    value,
                    last_checkpoint: last_checkpoint.clone(),
                });
            }
        }
        let lr = burn::optim::lr_scheduler::LrScheduler::step(&mut schedule);
        policy = TrainStep::optimize(policy, &mut optim, lr, grads);
        let seconds = step_started.elapsed().as_secs_f64();
        window.seconds += seconds;
        totals.seconds += seconds;
        totals.steps += 1;
        state.global_step = step;
        state.batch_in_epoch += group;
        window.grad_norm = grad_norm;
        window.lr = lr;
        observer.on_step(step, total_steps);
        let epoch = state.epoch as f64 + state.batch_in_epoch as f64 / batches_per_epoch as f64;
        let last = step == total_steps;

        if step.is_multiple_of(config.logging_steps) || last {
            let record = window.take(step, epoch, config.beta);
            log.append(&record)?;
            observer.on_log(&record);
            history.push(record);
        }
        let mut stop = false;
        if !run.eval.is_empty() && ((eval_every > 0 && step.is_multiple_of(eval_every)) || last) {
            let record = evaluate(&policy, &run, config, precomputed.as_ref(), step, epoch)?;
            log.append(&record)?;
            observer.on_log(&record);
            if let Some(patience) = config.early_stopping_patience {
                let metric = &config.metric_for_best_model;
                let value = record.get(metric).ok_or_else(|| {
                    TrainError::Data(format!("metric_for_best_model `{metric}` is not logged"))
                })?;
                let sign = if config.greater_is_better() {
                    1.0
                } else {
                    -1.0
                };
                let improved = state
                    .best_metric
                    .is_none_or(|best| sign * (value - best) > config.early_stopping_threshold);
                if improved {
                    state.best_metric = Some(value);
                    state.evals_without_improvement = 0;
                } else {
                    state.evals_without_improvement += 1;
                    if state.evals_without_improvement >= patience {
                        stop = true;
                    }
                }
            }
            history.push(record.clone());
            final_eval = Some(record);
        }
        if config.save_steps > 0 && step.is_multiple_of(config.save_steps) {
            let dir = save_checkpoint(
                &out,
                &policy,
                &optim,
                &state,
                &lora,
                run.base_model.as_deref(),
                config.save_total_limit,
            )?;
            observer.on_message(&format!("saved {}", dir.display()));
            last_checkpoint = Some(dir);
        }
        if stop {
            observer.on_message(&format!(
                "early stopping at step {step}: {} did not improve for {} evaluations",
                config.metric_for_best_model, state.evals_without_improvement
            ));
            stopped_early = true;
            break;
        }
    }

    let adapter_dir = out.join("adapter");
    prefer_lora::save_peft(
        &policy.model,
        POLICY_ADAPTER,
        &lora,
        run.base_model.as_deref(),
        &adapter_dir,
    )?;
    Ok(TrainSummary {
        steps: state.global_step,
        adapter_dir,
        history,
        final_eval,
        stopped_early,
        seconds: started.elapsed().as_secs_f64(),
        throughput: totals,
    })
}

/// Metrics of the optimiser steps since the last log line.
#[derive(Default)]
struct Window {
    records: PairRecords,
    loss_sum: f64,
    pairs: usize,
    tokens: usize,
    computed_tokens: usize,
    /// Wall time of the window's optimiser steps, from each step's first micro-batch to its
    /// parameter update (evaluation and checkpoints excluded).
    seconds: f64,
    grad_norm: f64,
    lr: f64,
}

impl Window {
    fn add(&mut self, out: &DpoOutput) {
        let n = out.records.len();
        self.loss_sum += out.loss * n as f64;
        self.pairs += n;
        self.tokens += out.tokens;
        self.computed_tokens += out.computed_tokens;
        self.records.extend(&out.records);
    }

    fn take(&mut self, step: usize, epoch: f64, beta: f64) -> LogRecord {
        let mut values = self.records.metrics(beta);
        values.insert("loss".into(), self.loss_sum / self.pairs.max(1) as f64);
        values.insert("grad_norm".into(), self.grad_norm);
        values.insert("learning_rate".into(), self.lr);
        values.insert(
            "tokens_per_second".into(),
            self.tokens as f64 / self.seconds.max(1e-9),
        );
        values.insert("tokens".into(), self.tokens as f64);
        values.insert("tokens_computed".into(), self.computed_tokens as f64);
        *self = Window::default();
        LogRecord {
            step,
            epoch,
            values,
        }
    }
}

/// Runs the held-out pairs through `InferenceStep` on the inner (non-autodiff) backend.
fn evaluate<B, L>(
    policy: &DpoPolicy<B, L>,
    run: &TrainRun,
    config: &TrainConfig,
    precomputed: Option<&(RefLogps, RefLogps)>,
    step: usize,
    epoch: f64,
) -> Result<LogRecord, TrainError>
where
    B: AutodiffBackend + PreferBackend,
    B::InnerBackend: PreferBackend,
    L: LinearLayer<B> + AutodiffModule<B>,
    L::InnerModule: LinearLayer<B::InnerBackend>,
    LoraLinear<B, L>: LinearLayer<B>,
{
    let inner = policy.valid();
    let device = inner.model.embed_tokens.weight.device();
    let mode = config.truncation()?;
    let mut records = PairRecords::default();
    let mut loss_sum = 0.0;
    let started = Instant::now();
    let mut tokens = 0;
    let bs = config.per_device_eval_batch_size;
    for (c, chunk) in run.eval.chunks(bs).enumerate() {
        let picked: Vec<&TokenizedPair> = chunk.iter().collect();
        let batch = collate(&picked, run.pad_id, config.max_length, mode)
            .to_device::<B::InnerBackend>(&device, config.packing());
        let ref_logps = precomputed.map(|(_, eval)| {
            let r = &eval[c * bs..c * bs + chunk.len()];
            let mut v: Vec<f32> = r.iter().map(|p| p.0).collect();
            v.extend(r.iter().map(|p| p.1));
            Tensor::<B::InnerBackend, 1>::from_floats(v.as_slice(), &device)
        });
        let out = InferenceStep::step(&inner, DpoInput { batch, ref_logps });
        loss_sum += out.loss * chunk.len() as f64;
        tokens += out.tokens;
        records.extend(&out.records);
    }
    let mut values = records.metrics(config.beta);
    values.insert("loss".into(), loss_sum / run.eval.len().max(1) as f64);
    values.insert(
        "tokens_per_second".into(),
        tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
    );
    let values = values
        .into_iter()
        .map(|(k, v)| (format!("eval_{k}"), v))
        .collect();
    Ok(LogRecord {
        step,
        epoch,
        values,
    })
}

/// Reference sums for the train and eval pairs from the starting policy's reference, through the
/// on-disk cache.
fn precompute<B, L>(
    policy: &DpoPolicy<B, L>,
    run: &TrainRun,
    config: &TrainConfig,
    observer: &mut dyn TrainObserver,
) -> Result<(RefLogps, RefLogps), TrainError>
where
    B: AutodiffBackend + PreferBackend,
    B::InnerBackend: PreferBackend,
    L: LinearLayer<B> + AutodiffModule<B>,
    L::InnerModule: LinearLayer<B::InnerBackend>,
    LoraLinear<B, L>: LinearLayer<B>,
{
    let mode = config.truncation()?;
    let mut reference = policy.valid().model;
    prefer_lora::set_active_adapter(&mut reference, policy.reference.as_deref());
    let mut key = run.model_fingerprint.str("reference");
    if let Some(name) = &policy.reference {
        for (_, layer) in reference.projections() {
            if let Some(ad) = layer.adapter(name) {
                key = key.tensor(ad.a.val()).tensor(ad.b.val());
            }
        }
    }
    let key =
        key.pairs(&run.train, config.max_length, mode)
            .pairs(&run.eval, config.max_length, mode);
    let dir = cache_dir();
    let n = run.train.len() + run.eval.len();
    if let Some(all) = read_cached(&dir, key, n) {
        observer.on_message(&format!(
            "reference log-probs read from the cache ({}/{:016x}.json)",
            dir.display(),
            key.0
        ));
        let (train, eval) = all.split_at(run.train.len());
        return Ok((train.to_vec(), eval.to_vec()));
    }
    let bs = config.per_device_eval_batch_size;
    let mut all = compute_ref_logps(
        &reference,
        &run.train,
        run.pad_id,
        config.max_length,
        mode,
        bs,
        config.packing(),
    );
    all.extend(compute_ref_logps(
        &reference,
        &run.eval,
        run.pad_id,
        config.max_length,
        mode,
        bs,
        config.packing(),
    ));
    match write_cached(&dir, key, &all) {
        Ok(path) => observer.on_message(&format!(
            "reference log-probs computed and cached in {}",
            path.display()
        )),
        Err(e) => observer.on_message(&format!(
            "reference log-probs computed; the cache in {} could not be written: {e}",
            dir.display()
        )),
    }
    let (train, eval) = all.split_at(run.train.len());
    Ok((train.to_vec(), eval.to_vec()))
}

/// Whether `path` looks like a checkpoint directory.
pub fn is_checkpoint(path: &Path) -> bool {
    path.join("trainer_state.json").is_file() && path.join("adapter").is_dir()
}
