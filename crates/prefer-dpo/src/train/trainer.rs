//! The training loop: micro-batches through `TrainStep`, gradients averaged over
//! `gradient_accumulation_steps` and clipped by their global norm, then one `lr_step` and one
//! `optimizer_step` of burn-train's `Learner` per optimiser step, and logging, evaluation,
//! checkpoints and early stopping counted in optimiser steps — TRL's semantics, which burn-train's
//! `SupervisedTraining` loop does not have (it steps the rate per micro-batch, sums accumulated
//! gradients, clips per tensor and checkpoints per epoch only), so the loop is here and drives the
//! `Learner` itself.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use burn::{
    module::{AutodiffModule, Module},
    optim::{AdamWConfig, GradientsAccumulator},
    tensor::{
        Tensor,
        backend::{AutodiffBackend, Backend},
    },
    train::Learner,
};
use prefer_llama::LlamaModel;
use prefer_lora::{LoraConfig, LoraLinear, snapshot_adapter};
use rand::{SeedableRng, seq::SliceRandom};

use super::{
    TrainError,
    bounds::{BaseLayer, TrainBackend},
    checkpoint::{
        BestModel, DpoOptimizer, POLICY_ADAPTER, REFERENCE_ADAPTER, TrainerState,
        latest_checkpoint, load_checkpoint, save_checkpoint,
    },
    clip::average_and_clip,
    config::{IntervalStrategy, LrSchedulerType, SaveStrategy, TrainConfig},
    data_parallel::{self, Replica},
    early_stopping::{EarlyStopping, Progress},
    learner::{DpoLearner, Shared, TrlSchedule},
    machines::{Machines, Network},
    metrics_log::{LogRecord, MetricsLog},
    plan::StepPlan,
    plateau::{Plateau, PlateauOptions},
    reference::{
        Fingerprint, RefLogps, cache_dir, cache_key, compute_ref_logps, read_cached, ref_tensor,
        write_cached,
    },
    reference_sync::sync_reference_if_due,
    schedule::LrSchedule,
    step::{DpoInput, DpoPolicy},
    window::Window,
};
use crate::{
    data::{TokenizedPair, check_labels, check_vocab, collate, collate_kto},
    host::read,
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
    /// A micro-batch ran: its loss and per-pair values (what burn-train's metrics take, through
    /// [`crate::train::PreferenceMetric`]).
    fn on_micro_batch(&mut self, _output: &super::DpoOutput) {}
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
///
/// The run reads top to bottom: check the inputs, set up the policy and its reference, plan the
/// steps, start fresh or resume, then optimiser steps — each followed by logging, evaluation,
/// checkpointing and the early-stopping check when due — and finally the adapter.
pub fn train<B: TrainBackend, L: BaseLayer<B>>(
    model: LoraLlama<B, L>,
    run: TrainRun,
    config: &TrainConfig,
    observer: &mut dyn TrainObserver,
) -> Result<TrainSummary, TrainError> {
    config.validate()?;
    config.check_backend::<B>(&model.embed_tokens.weight.device())?;
    check_inputs(&model, &run, config)?;
    let inner = inner_device::<B>(&model.embed_tokens.weight.device());
    train_replica((model, inner), &run, config, observer, &Replica::single())
}

/// [`train`] with data parallelism over `devices` of this process: one replica of the model per
/// device (rank `i` on `devices[i]`), each running `per_device_train_batch_size` pairs of every
/// micro-batch, the adapter gradients averaged over the replicas before each optimiser step.
/// Rank 0 (here, with `observer`) writes the logs and checkpoints and runs the evaluations.
///
/// The adapter equals one device's with `per_device_train_batch_size × devices` pairs per
/// micro-batch (the last, short micro-batch of an epoch is filled from the epoch's start, as
/// accelerate's `even_batches` does).
pub fn train_data_parallel<B: TrainBackend, L: BaseLayer<B>>(
    model: LoraLlama<B, L>,
    devices: &[B::Device],
    run: TrainRun,
    config: &TrainConfig,
    observer: &mut dyn TrainObserver,
) -> Result<TrainSummary, TrainError> {
    if devices.len() <= 1 {
        let model = match devices.first() {
            Some(device) => model.fork(device),
            None => model,
        };
        return train(model, run, config, observer);
    }
    train_local_replicas(model, devices, None, &run, config, observer)
}

/// [`train_data_parallel`] on one of several machines (processes): every machine runs this
/// with the same config, data and number of `devices`, its own `machine_rank`, and machine 0's
/// address; the replicas of all machines train as one run. Machine 0's rank 0 writes the logs
/// and checkpoints (resuming needs them where every machine reads them, e.g. a shared
/// directory).
pub fn train_on_machines<B: TrainBackend, L: BaseLayer<B>>(
    model: LoraLlama<B, L>,
    devices: &[B::Device],
    machines: &Machines,
    run: TrainRun,
    config: &TrainConfig,
    observer: &mut dyn TrainObserver,
) -> Result<TrainSummary, TrainError> {
    if machines.num_machines <= 1 {
        return train_data_parallel(model, devices, run, config, observer);
    }
    train_local_replicas(model, devices, Some(machines), &run, config, observer)
}

/// Runs one replica per device of this process, each on its own thread (the first on this one,
/// with `observer`), joined with the other machines' when there are, and returns the first
/// replica's summary or the error of the replica that failed first.
fn train_local_replicas<B: TrainBackend, L: BaseLayer<B>>(
    model: LoraLlama<B, L>,
    devices: &[B::Device],
    machines: Option<&Machines>,
    run: &TrainRun,
    config: &TrainConfig,
    observer: &mut dyn TrainObserver,
) -> Result<TrainSummary, TrainError> {
    // Everything that can refuse the run does so before any replica waits for the others.
    config.validate()?;
    for device in devices {
        config.check_backend::<B>(device)?;
    }
    check_inputs(&model, run, config)?;
    let local = devices.len();
    let network = match machines {
        Some(m) => Some(Arc::new(Network::join(m, local)?)),
        None => None,
    };
    let _one_run_at_a_time = data_parallel::exclusive();
    // Every copy is made before any replica starts: one that fails (a device out of memory) fails
    // here, not while the others wait for it to join, which nothing could end.
    let mut copies: Vec<_> = devices.iter().map(|d| replica_of(&model, d)).collect();
    drop(model);
    let first_copy = copies.remove(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = copies
            .into_iter()
            .enumerate()
            .map(|(i, model)| {
                let replica = Replica::new(i + 1, local, network.clone());
                let rank = replica.rank;
                let worker =
                    scope.spawn(move || train_replica(model, run, config, &mut Silent, &replica));
                (rank, worker)
            })
            .collect();
        let first = Replica::new(0, local, network.clone());
        let mut results = vec![(
            first.rank,
            train_replica(first_copy, run, config, observer, &first),
        )];
        for (rank, worker) in workers {
            let result = worker.join().unwrap_or_else(|panic| {
                Err(TrainError::Collective {
                    rank,
                    message: format!("panicked: {}", panic_message(&*panic)),
                })
            });
            results.push((rank, result));
        }
        first_failure(results)
    })
}

/// A copy of `model` on `device` whose tensors are autodiff nodes of its own (`fork` keeps the
/// nodes of constant tensors, and Burn links the graphs of tensors that share one), with the
/// device as the inner backend's; on the same device the copies share their buffers.
fn replica_of<B: TrainBackend, L: BaseLayer<B>>(
    model: &LoraLlama<B, L>,
    device: &B::Device,
) -> (LoraLlama<B, L>, burn::tensor::Device<B::InnerBackend>) {
    let copy = LoraLlama::<B, L>::from_inner(model.valid()).fork(device);
    (copy, inner_device::<B>(device))
}

/// The first replica's summary when every replica finished, else the error that stopped the run:
/// a replica's own failure rather than the "another replica stopped" of those it stopped.
fn first_failure(
    results: Vec<(usize, Result<TrainSummary, TrainError>)>,
) -> Result<TrainSummary, TrainError> {
    let mut summary = None;
    let mut knock_on = None;
    for (i, (rank, result)) in results.into_iter().enumerate() {
        match result {
            Ok(s) if i == 0 => summary = Some(s),
            Ok(_) => {}
            Err(e) if e.is_knock_on() => knock_on = knock_on.or(Some(e)),
            Err(e) if i == 0 => return Err(e),
            Err(e) => {
                return Err(TrainError::Replica {
                    rank,
                    source: Box::new(e),
                });
            }
        }
    }
    if let Some(e) = knock_on {
        return Err(e);
    }
    summary.ok_or_else(|| TrainError::Collective {
        rank: 0,
        message: "no replica ran".into(),
    })
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

/// One replica's run, [`train`]'s body: joins the other replicas, trains, and leaves; a failure
/// (or a panic) stops the other replicas' collective calls.
fn train_replica<B: TrainBackend, L: BaseLayer<B>>(
    (model, inner_device): (LoraLlama<B, L>, burn::tensor::Device<B::InnerBackend>),
    run: &TrainRun,
    config: &TrainConfig,
    observer: &mut dyn TrainObserver,
    replica: &Replica,
) -> Result<TrainSummary, TrainError> {
    replica.register::<B::InnerBackend>(&inner_device)?;
    let mut leave = AbortUnlessFinished::<B::InnerBackend> {
        replica,
        finished: false,
        _backend: std::marker::PhantomData,
    };
    let summary = train_steps(model, run, config, observer, replica)?;
    replica.finish::<B::InnerBackend>()?;
    leave.finished = true;
    Ok(summary)
}

/// Resets the collective engine when a replica leaves early (an error or a panic), so the
/// others' calls return instead of waiting for it.
struct AbortUnlessFinished<'a, C: Backend> {
    replica: &'a Replica,
    finished: bool,
    _backend: std::marker::PhantomData<C>,
}

impl<C: Backend> Drop for AbortUnlessFinished<'_, C> {
    fn drop(&mut self) {
        if !self.finished {
            self.replica.abort::<C>();
        }
    }
}

/// The inner backend's device of `device`.
fn inner_device<B: TrainBackend>(device: &B::Device) -> burn::tensor::Device<B::InnerBackend> {
    burn::tensor::Tensor::<B, 1>::zeros([1], device)
        .inner()
        .device()
}

/// The run of one replica: set up the policy and its reference, plan the steps, start fresh or
/// resume, then optimiser steps — each followed by logging, evaluation, checkpointing and the
/// early-stopping check when due — and finally the adapter.
fn train_steps<B: TrainBackend, L: BaseLayer<B>>(
    model: LoraLlama<B, L>,
    run: &TrainRun,
    config: &TrainConfig,
    observer: &mut dyn TrainObserver,
    replica: &Replica,
) -> Result<TrainSummary, TrainError> {
    let device = model.embed_tokens.weight.device();
    let out = config.output_dir.clone();
    if replica.is_main() {
        create_output_dir(&out)?;
    }
    let mut policy = policy_with_reference(model, &run.reference, config);
    let inputs = Inputs {
        run,
        config,
        inner_device: inner_device::<B>(&device),
        device,
        precomputed: None,
        replica,
    };
    let precomputed = reference_logps(&policy, &inputs, observer)?;
    let inputs = Inputs {
        precomputed: precomputed.as_ref(),
        ..inputs
    };

    let plan = StepPlan::new(config, run.train.len(), replica.world);
    let (optim, state) = optimiser_and_state(&mut policy, run, config, plan, &out, observer)?;
    replicas_agree(&policy, &state, &inputs)?;
    if replica.is_main() {
        remove_unfinished_checkpoints(&out);
    }
    let mut steps = StepLoop::open(inputs, plan, policy, optim, state, &out, observer)?;
    steps.evaluate_on_start()?;

    steps.announce_start();
    let started = Instant::now();
    let mut stopped_early = false;
    while !steps.finished() {
        let at = steps.optimiser_step()?;
        steps.log_window_if_due(at)?;
        let stop = steps.evaluate_if_due(at)?;
        steps.checkpoint_if_due(at)?;
        if stop {
            steps.announce_early_stop(at);
            stopped_early = true;
            break;
        }
    }

    let adapter_dir = out.join("adapter");
    if replica.is_main() {
        match steps.best_checkpoint_to_keep() {
            Some(best) => steps.adopt_best_checkpoint(best, &adapter_dir)?,
            None => prefer_lora::save_peft(
                &steps.learner.model().model,
                POLICY_ADAPTER,
                &steps.lora,
                run.base_model.as_deref(),
                &adapter_dir,
            )?,
        }
    }
    Ok(TrainSummary {
        steps: steps.state.global_step,
        adapter_dir,
        history: steps.history,
        final_eval: steps.final_eval,
        stopped_early,
        seconds: started.elapsed().as_secs_f64(),
        throughput: steps.totals,
    })
}

/// The output directory, created if needed.
fn create_output_dir(out: &Path) -> Result<PathBuf, TrainError> {
    std::fs::create_dir_all(out).map_err(|e| TrainError::Checkpoint {
        path: out.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(out.to_path_buf())
}

/// A fresh AdamW and trainer state, or those of the checkpoint `run.resume` names (whose adapter
/// is loaded into `policy`).
fn optimiser_and_state<B: TrainBackend, L: BaseLayer<B>>(
    policy: &mut DpoPolicy<B, L>,
    run: &TrainRun,
    config: &TrainConfig,
    plan: StepPlan,
    out: &Path,
    observer: &mut dyn TrainObserver,
) -> Result<(DpoOptimizer<B, L>, TrainerState), TrainError> {
    let optim: DpoOptimizer<B, L> = AdamWConfig::new()
        .with_beta_1(config.adam_beta1 as f32)
        .with_beta_2(config.adam_beta2 as f32)
        .with_epsilon(config.adam_epsilon as f32)
        .with_weight_decay(config.weight_decay as f32)
        .init();
    let state = TrainerState {
        global_step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        total_steps: plan.total_steps,
        seed: config.seed,
        best_metric: None,
        evals_without_improvement: 0,
        best_model: None,
        plateau: None,
        pairs_per_batch: Some(plan.global_batch()),
        pairs_per_step: Some(plan.global_batch() * plan.accumulation),
    };
    let Some(resume) = &run.resume else {
        return Ok((optim, state));
    };
    let dir = resume_dir(resume, out)?;
    let (optim, state) = resume_from(&dir, policy, optim, config, plan, run.train.len())?;
    observer.on_message(&format!(
        "resumed from {} at step {}",
        dir.display(),
        state.global_step
    ));
    Ok((optim, state))
}

/// Where an optimiser step left the run: its number (from 1), the fractional epoch TRL logs,
/// whether it ended an epoch and whether it was the plan's last.
#[derive(Debug, Clone, Copy)]
struct StepAt {
    step: usize,
    epoch: f64,
    epoch_end: bool,
    last: bool,
}

impl StepAt {
    /// Whether `strategy` (with its every-N-steps interval) falls due after this step; `steps`
    /// and `epoch` are also due after the last step.
    fn due(&self, strategy: IntervalStrategy, every: usize) -> bool {
        match strategy {
            IntervalStrategy::No => false,
            IntervalStrategy::Steps => (every > 0 && self.step.is_multiple_of(every)) || self.last,
            IntervalStrategy::Epoch => self.epoch_end || self.last,
        }
    }
}

/// Everything the loop carries from one optimiser step to the next: the Learner (policy, optimiser,
/// schedule) with the loop's handles to its optimiser and schedule, the trainer state that
/// checkpoints save, the metrics log, the current log window and the run's totals.
struct StepLoop<'a, B: TrainBackend, L: BaseLayer<B>> {
    inputs: Inputs<'a, B>,
    plan: StepPlan,
    out: &'a Path,
    /// The adapter's options, written beside every saved adapter.
    lora: LoraConfig,
    learner: DpoLearner<B, L>,
    /// The Learner's optimiser, read for checkpoints.
    optim: Shared<DpoOptimizer<B, L>>,
    /// The Learner's schedule, given `reduce_lr_on_plateau`'s rate.
    schedule: Shared<TrlSchedule>,
    state: TrainerState,
    early_stopping: Option<EarlyStopping>,
    /// The metrics files (rank 0 only).
    log: Option<MetricsLog>,
    /// Every logged row, those of the run before a resume included.
    history: Vec<LogRecord>,
    /// Named in the error when a step's loss or gradient norm is not finite.
    last_checkpoint: Option<PathBuf>,
    /// The seeded order of the current epoch's pairs.
    epoch_order: Vec<usize>,
    /// Training metrics since the last logged row.
    window: Window,
    totals: Throughput,
    final_eval: Option<LogRecord>,
    /// The value of `metric_for_best_model` of this step's evaluation when it beats the best
    /// checkpoint's (it becomes the best when this step is saved).
    new_best: Option<(usize, f64)>,
    observer: &'a mut dyn TrainObserver,
}

impl<'a, B: TrainBackend, L: BaseLayer<B>> StepLoop<'a, B, L> {
    /// The loop at `state` (fresh or resumed): its schedule at the same step, and the metrics log
    /// truncated to the rows up to that step.
    fn open(
        inputs: Inputs<'a, B>,
        plan: StepPlan,
        policy: DpoPolicy<B, L>,
        optim: DpoOptimizer<B, L>,
        mut state: TrainerState,
        out: &'a Path,
        observer: &'a mut dyn TrainObserver,
    ) -> Result<Self, TrainError> {
        let config = inputs.config;
        if config.lr_scheduler_type == LrSchedulerType::ReduceLrOnPlateau && state.plateau.is_none()
        {
            state.plateau = Some(Plateau::new(config.learning_rate));
        }
        let schedule = Shared::new(TrlSchedule {
            schedule: LrSchedule {
                kind: config.lr_scheduler_type,
                kwargs: config.lr_scheduler_kwargs.clone(),
                peak: config.learning_rate,
                warmup: plan.warmup_steps,
                total: plan.total_steps,
                step: state.global_step,
            },
            plateau_lr: None,
        });
        let optim = Shared::new(optim);
        let learner = Learner::new(policy, optim.clone(), schedule.clone());
        let log = match inputs.replica.is_main() {
            true => Some(MetricsLog::open(out, state.global_step)?),
            false => None,
        };
        let history = match &log {
            Some(log) => log.read()?,
            None => Vec::new(),
        };
        Ok(Self {
            epoch_order: inputs.order(state.epoch),
            early_stopping: EarlyStopping::from_config(config),
            last_checkpoint: latest_checkpoint(out),
            inputs,
            plan,
            out,
            lora: config.lora()?,
            learner,
            optim,
            schedule,
            state,
            log,
            history,
            window: Window::default(),
            totals: Throughput::default(),
            final_eval: None,
            new_best: None,
            observer,
        })
    }

    /// Tells the observer from which step of how many the loop starts.
    fn announce_start(&mut self) {
        self.observer
            .on_start(self.state.global_step, self.plan.total_steps);
    }

    /// Whether the plan's steps are all taken.
    fn finished(&self) -> bool {
        self.state.global_step >= self.plan.total_steps
    }

    /// `eval_on_start`: one evaluation before the first step of a fresh run.
    fn evaluate_on_start(&mut self) -> Result<(), TrainError> {
        let eval_pairs = !self.inputs.run.eval.is_empty();
        if self.inputs.config.eval_on_start && self.state.global_step == 0 && eval_pairs {
            let record = evaluate(&self.learner.model(), &self.inputs, 0, 0.0)?;
            self.record(record)?;
        }
        Ok(())
    }

    /// One optimiser step: its micro-batches, a refusal of a non-finite loss or gradient norm, the
    /// Learner's rate step and parameter update (and TR-DPO's reference sync when due); the step's
    /// time and tokens are counted.
    fn optimiser_step(&mut self) -> Result<StepAt, TrainError> {
        let step_started = Instant::now();
        let (plan, state) = (self.plan, &mut self.state);
        if state.batch_in_epoch >= plan.batches_per_epoch {
            state.epoch += 1;
            state.batch_in_epoch = 0;
            self.epoch_order = self.inputs.order(state.epoch);
        }
        let step = state.global_step + 1;
        let group = plan.group(state.batch_in_epoch);
        let StepResult {
            grads,
            loss,
            grad_norm,
            tokens,
            computed_tokens,
        } = micro_batches(
            &self.learner.model(),
            &self.inputs,
            &plan,
            state,
            &self.epoch_order,
            &mut self.window,
            &mut *self.observer,
        )?;
        for (metric, value) in [("loss", loss), ("grad_norm", grad_norm)] {
            if !value.is_finite() {
                return Err(TrainError::NonFinite {
                    step,
                    metric: metric.into(),
                    value,
                    last_checkpoint: self.last_checkpoint.clone(),
                });
            }
        }
        self.schedule.lock().plateau_lr = state.plateau.map(|p| p.lr);
        self.learner.lr_step();
        let lr = self.learner.lr_current();
        self.learner.optimizer_step(grads);
        let mut policy = self.learner.model();
        if sync_reference_if_due(&mut policy, self.inputs.config, step) {
            self.learner.load_model(policy.into_record());
        }
        let seconds = step_started.elapsed().as_secs_f64();
        self.window.finish_step(seconds, grad_norm, lr);
        let totals = &mut self.totals;
        totals.steps += 1;
        totals.seconds += seconds;
        totals.tokens += tokens;
        totals.computed_tokens += computed_tokens;
        state.global_step = step;
        state.batch_in_epoch += group;
        self.observer.on_step(step, plan.total_steps);
        let epoch =
            state.epoch as f64 + state.batch_in_epoch as f64 / plan.batches_per_epoch as f64;
        let at = StepAt {
            step,
            epoch,
            epoch_end: state.batch_in_epoch >= plan.batches_per_epoch,
            last: step == plan.total_steps,
        };
        Ok(at)
    }

    /// When `logging_strategy` falls due (and after the first step with `logging_first_step`):
    /// the window's training metrics as one row.
    fn log_window_if_due(&mut self, at: StepAt) -> Result<(), TrainError> {
        let config = self.inputs.config;
        let first = config.logging_first_step && at.step == 1;
        if first || at.due(config.logging_strategy, config.logging_steps) {
            let record = self
                .window
                .take(at.step, at.epoch, &self.inputs.config.loss());
            self.record(record)?;
        }
        Ok(())
    }

    /// When `eval_strategy` falls due and there are held-out pairs: one evaluation, logged, fed to
    /// early stopping and compared with the best checkpoint's. Returns whether early stopping ends
    /// the run.
    fn evaluate_if_due(&mut self, at: StepAt) -> Result<bool, TrainError> {
        let config = self.inputs.config;
        self.new_best = None;
        if self.inputs.run.eval.is_empty() || !at.due(config.eval_strategy(), config.eval_every()) {
            return Ok(false);
        }
        let record = evaluate(&self.learner.model(), &self.inputs, at.step, at.epoch)?;
        self.record(record.clone())?;
        if self.state.plateau.is_some() {
            let value = best_metric_of(config, &record)?;
            if let Some(plateau) = &mut self.state.plateau {
                plateau.observe(value, &PlateauOptions::from(&config.lr_scheduler_kwargs));
            }
        }
        let stop = self.early_stopping_says_stop(&record)?;
        if config.tracks_best_model() {
            self.new_best = self.beats_best(&record)?.map(|v| (at.step, v));
        }
        self.final_eval = Some(record);
        Ok(stop)
    }

    /// The value of `metric_for_best_model` in `record` when it beats the best checkpoint's.
    fn beats_best(&self, record: &LogRecord) -> Result<Option<f64>, TrainError> {
        let config = self.inputs.config;
        let value = best_metric_of(config, record)?;
        let sign = if config.greater_is_better() {
            1.0
        } else {
            -1.0
        };
        let better = self
            .state
            .best_model
            .is_none_or(|best| sign * (value - best.value) > 0.0);
        Ok(better.then_some(value))
    }

    /// Feeds an evaluation to early stopping (when configured), keeping its progress in the
    /// trainer state so a checkpoint carries it; true when patience has run out.
    fn early_stopping_says_stop(&mut self, record: &LogRecord) -> Result<bool, TrainError> {
        let Some(rule) = &self.early_stopping else {
            return Ok(false);
        };
        let mut progress = Progress {
            best: self.state.best_metric,
            without_improvement: self.state.evals_without_improvement,
        };
        let stop = rule.update(&mut progress, record)?;
        self.state.best_metric = progress.best;
        self.state.evals_without_improvement = progress.without_improvement;
        Ok(stop)
    }

    /// When `save_strategy` falls due: adapter, optimiser and trainer state in
    /// `checkpoint-<step>` (after the evaluation, so the saved state holds its early-stopping
    /// progress and, when this step's evaluation is the best so far, marks itself the best).
    fn checkpoint_if_due(&mut self, at: StepAt) -> Result<(), TrainError> {
        let config = self.inputs.config;
        let due = match config.save_strategy {
            SaveStrategy::No => false,
            SaveStrategy::Steps => {
                config.save_steps > 0 && at.step.is_multiple_of(config.save_steps)
            }
            SaveStrategy::Epoch => at.epoch_end,
            SaveStrategy::Best => self.new_best.is_some(),
        };
        if !due {
            return Ok(());
        }
        if let Some((step, value)) = self.new_best.take() {
            self.state.best_model = Some(BestModel { step, value });
        }
        let dir = match self.inputs.replica.is_main() {
            true => save_checkpoint(
                self.out,
                &self.learner.model(),
                &self.optim.lock(),
                &self.state,
                &self.lora,
                self.inputs.run.base_model.as_deref(),
                config.save_total_limit,
            )?,
            false => self.out.join(format!("checkpoint-{}", at.step)),
        };
        if self.inputs.replica.is_main() {
            self.observer
                .on_message(&format!("saved {}", dir.display()));
        }
        self.last_checkpoint = Some(dir);
        Ok(())
    }

    /// With `load_best_model_at_end`: the best checkpoint, unless the final evaluation beat it
    /// (then the final policy is the best).
    fn best_checkpoint_to_keep(&self) -> Option<BestModel> {
        if !self.inputs.config.load_best_model_at_end || self.new_best.is_some() {
            return None;
        }
        self.state.best_model
    }

    /// Makes the best checkpoint's adapter the final one (copied whole, then renamed into place).
    fn adopt_best_checkpoint(
        &mut self,
        best: BestModel,
        adapter_dir: &Path,
    ) -> Result<(), TrainError> {
        let from = self
            .out
            .join(format!("checkpoint-{}", best.step))
            .join("adapter");
        copy_dir_atomically(&from, adapter_dir)?;
        self.observer.on_message(&format!(
            "load_best_model_at_end: the final adapter is checkpoint-{}'s ({} {})",
            best.step,
            self.inputs.config.best_metric(),
            best.value
        ));
        Ok(())
    }

    /// Says why the run ends before its last step.
    fn announce_early_stop(&mut self, at: StepAt) {
        self.observer.on_message(&format!(
            "early stopping at step {}: {} did not improve for {} evaluations",
            at.step, self.inputs.config.metric_for_best_model, self.state.evals_without_improvement
        ));
    }

    /// A row into the metrics file, the observer and the history.
    fn record(&mut self, record: LogRecord) -> Result<(), TrainError> {
        if let Some(log) = &self.log {
            log.append(&record)?;
        }
        self.observer.on_log(&record);
        self.history.push(record);
        Ok(())
    }
}

/// The pairs must be there, fit the model's vocabulary, and the model must carry the adapter to
/// train.
/// The value of `metric_for_best_model` in an evaluation's `record`.
fn best_metric_of(config: &TrainConfig, record: &LogRecord) -> Result<f64, TrainError> {
    let metric = config.best_metric();
    record
        .get(&metric)
        .ok_or_else(|| TrainError::Data(format!("metric_for_best_model `{metric}` is not logged")))
}

fn check_inputs<B: TrainBackend, L: BaseLayer<B>>(
    model: &LoraLlama<B, L>,
    run: &TrainRun,
    config: &TrainConfig,
) -> Result<(), TrainError> {
    if run.train.is_empty() {
        return Err(TrainError::Data("no training pairs".into()));
    }
    if config.needs_eval_pairs() && run.eval.is_empty() {
        return Err(TrainError::Data(
            "load_best_model_at_end, save_strategy = \"best\" and reduce_lr_on_plateau need held-out pairs (eval_data, a test split or eval_ratio)".into(),
        ));
    }
    let vocab = model.config.vocab_size;
    for pairs in [&run.train, &run.eval] {
        check_vocab(pairs, run.pad_id, vocab).map_err(|b| TrainError::Data(b.to_string()))?;
        if config.method.unpaired() {
            check_labels(pairs).map_err(|b| TrainError::Data(b.to_string()))?;
        }
    }
    if !config.method.uses_reference()
        && matches!(run.reference, ReferenceSource::Precomputed { .. })
    {
        return Err(TrainError::Data(format!(
            "method {} uses no reference, yet precomputed reference log-probs were given",
            config.method
        )));
    }
    if config.sync_ref_model && !matches!(run.reference, ReferenceSource::Snapshot) {
        return Err(TrainError::Data(
            "sync_ref_model moves the reference adapter towards the policy, so the reference must \
             be the starting adapter: remove ref_model"
                .into(),
        ));
    }
    if !model
        .projections()
        .iter()
        .any(|(_, l)| l.adapter(POLICY_ADAPTER).is_some())
    {
        return Err(TrainError::Data(format!(
            "the model has no adapter named `{POLICY_ADAPTER}` to train"
        )));
    }
    Ok(())
}

/// The policy, with a frozen snapshot of its starting adapter as the reference when the reference
/// is the snapshot.
fn policy_with_reference<B: TrainBackend, L: BaseLayer<B>>(
    mut model: LoraLlama<B, L>,
    source: &ReferenceSource,
    config: &TrainConfig,
) -> DpoPolicy<B, L> {
    if config.disable_dropout {
        for (_, layer) in model.projections_mut() {
            layer.dropout = burn::nn::DropoutConfig::new(0.0).init();
        }
    }
    let reference = match source {
        // A reference-free method keeps no snapshot: no second adapter in memory or checkpoints.
        _ if !config.method.uses_reference() => None,
        ReferenceSource::Snapshot => {
            snapshot_adapter(&mut model, POLICY_ADAPTER, REFERENCE_ADAPTER);
            Some(REFERENCE_ADAPTER.to_string())
        }
        _ => None,
    };
    model.set_gradient_checkpointing(config.gradient_checkpointing);
    model.set_compute_dtype(config.compute_dtype().float_dtype());
    DpoPolicy {
        model,
        loss: config.loss(),
        reference,
    }
}

/// Precomputed reference log-probs: given, read from the cache, or computed now (by rank 0, which
/// hands them to the other replicas) and cached; `None` when the reference runs beside the
/// policy in every step.
fn reference_logps<B: TrainBackend, L: BaseLayer<B>>(
    policy: &DpoPolicy<B, L>,
    inputs: &Inputs<'_, B>,
    observer: &mut dyn TrainObserver,
) -> Result<Option<(RefLogps, RefLogps)>, TrainError> {
    let (run, config, replica) = (inputs.run, inputs.config, inputs.replica);
    match &run.reference {
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
            Ok(Some((train.clone(), eval.clone())))
        }
        _ if config.precompute_ref_log_probs => {
            let mine = match replica.is_main() {
                true => Some(precompute(policy, run, config, observer)?),
                false => None,
            };
            let shared = replica.share::<B::InnerBackend, _>(&mine, &inputs.inner_device)?;
            Ok(Some(shared.ok_or_else(|| TrainError::Collective {
                rank: 0,
                message: "sent no reference log-probs".into(),
            })?))
        }
        _ => Ok(None),
    }
}

/// The checkpoint directory a resume asks for.
fn resume_dir(resume: &Resume, out: &Path) -> Result<PathBuf, TrainError> {
    match resume {
        Resume::From(d) => Ok(d.clone()),
        Resume::Latest => latest_checkpoint(out).ok_or_else(|| TrainError::Checkpoint {
            path: out.to_path_buf(),
            message: "no checkpoint to resume from".into(),
        }),
    }
}

/// Loads the adapter, optimiser and trainer state of checkpoint `dir`, which must have been
/// trained with the same seed.
fn resume_from<B: TrainBackend, L: BaseLayer<B>>(
    dir: &Path,
    policy: &mut DpoPolicy<B, L>,
    optim: DpoOptimizer<B, L>,
    config: &TrainConfig,
    plan: StepPlan,
    run_pairs: usize,
) -> Result<(DpoOptimizer<B, L>, TrainerState), TrainError> {
    let (optim, state) = load_checkpoint(dir, policy, optim)?;
    if state.seed != config.seed {
        return Err(TrainError::Checkpoint {
            path: dir.to_path_buf(),
            message: format!(
                "the checkpoint was trained with seed {} but the config says {}",
                state.seed, config.seed
            ),
        });
    }
    let batch_in_epoch = place_in_epoch(&state, plan, run_pairs, dir)?;
    let state = TrainerState {
        total_steps: plan.total_steps,
        batch_in_epoch,
        pairs_per_batch: Some(plan.global_batch()),
        pairs_per_step: Some(plan.global_batch() * plan.accumulation),
        ..state
    };
    Ok((optim, state))
}

/// The micro-batch of the saved epoch at which `plan` goes on: the same pairs done, counted in
/// the new micro-batches when the checkpoint was written with another number of replicas or
/// per-device batch size.
fn place_in_epoch(
    state: &TrainerState,
    plan: StepPlan,
    n_pairs: usize,
    dir: &Path,
) -> Result<usize, TrainError> {
    let per_step = plan.global_batch() * plan.accumulation;
    if let Some(saved) = state.pairs_per_step
        && saved != per_step
    {
        return Err(TrainError::Checkpoint {
            path: dir.to_path_buf(),
            message: format!(
                "the checkpoint's run took {saved} pairs per optimiser step and this one takes \
                 {per_step} (per_device_train_batch_size × devices × gradient_accumulation_steps): \
                 its steps, schedule and logs count in its own steps, so keep the product"
            ),
        });
    }
    // Checkpoints written before data parallelism came from one device.
    let saved = state.pairs_per_batch.unwrap_or(plan.batch_size);
    if saved == plan.global_batch() {
        return Ok(state.batch_in_epoch);
    }
    if state.batch_in_epoch >= n_pairs.div_ceil(saved) {
        return Ok(plan.batches_per_epoch);
    }
    let done = state.batch_in_epoch * saved;
    if !done.is_multiple_of(plan.global_batch()) {
        return Err(TrainError::Checkpoint {
            path: dir.to_path_buf(),
            message: format!(
                "the checkpoint is {done} pairs into its epoch, which is not a whole number of \
                 micro-batches of {} pairs (per_device_train_batch_size × devices); resume with \
                 a batch that divides {done}",
                plan.global_batch()
            ),
        });
    }
    Ok(done / plan.global_batch())
}

/// Every replica must start from the same step and the same adapter: each machine reads its own
/// `output_dir`, and one that resumed from another checkpoint (a directory that is not shared,
/// an old run's) would train other weights with the averaged gradients.
fn replicas_agree<B: TrainBackend, L: BaseLayer<B>>(
    policy: &DpoPolicy<B, L>,
    state: &TrainerState,
    inputs: &Inputs<'_, B>,
) -> Result<(), TrainError> {
    let replica = inputs.replica;
    if replica.world == 1 {
        return Ok(());
    }
    let mut sums = TrainableSums::<B> { sums: Vec::new() };
    policy.visit(&mut sums);
    let sums: Vec<f64> = match sums.sums.is_empty() {
        true => Vec::new(),
        false => read(Tensor::cat(sums.sums, 0), "the adapter's sums")?,
    };
    let mine = (state.global_step, sums);
    let all = replica.gather::<B::InnerBackend, _>(&mine, &inputs.inner_device)?;
    match all.iter().position(|theirs| *theirs != all[0]) {
        None => Ok(()),
        Some(rank) => Err(TrainError::Collective {
            rank,
            message: format!(
                "starts at step {} with another adapter than rank 0 (at step {}): every machine \
                 must resume from the same checkpoint (give them one shared output_dir)",
                all[rank].0, all[0].0
            ),
        }),
    }
}

/// The sum of each trainable parameter, in the module's order.
struct TrainableSums<B: AutodiffBackend> {
    sums: Vec<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> burn::module::ModuleVisitor<B> for TrainableSums<B> {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
        if param.is_require_grad() {
            self.sums.push(param.val().inner().sum());
        }
    }
}

/// A process killed while writing a checkpoint leaves its temporary directory behind.
fn remove_unfinished_checkpoints(out: &Path) {
    if let Ok(entries) = std::fs::read_dir(out) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(".checkpoint-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// What the steps and evaluations read: the pairs, their order, and the batches built from them.
struct Inputs<'a, B: AutodiffBackend> {
    run: &'a TrainRun,
    config: &'a TrainConfig,
    device: B::Device,
    /// The same device, as the inner backend's (where replicas exchange values).
    inner_device: burn::tensor::Device<B::InnerBackend>,
    precomputed: Option<&'a (RefLogps, RefLogps)>,
    replica: &'a Replica,
}

impl<B: AutodiffBackend> Inputs<'_, B> {
    /// The seeded order of the training pairs in `epoch`; KTO's examples keep theirs (TRL's
    /// sequential sampler), as each batch holds its examples' KL completions.
    fn order(&self, epoch: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.run.train.len()).collect();
        if self.config.method.unpaired() {
            return idx;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(mix(self.config.seed, epoch as u64));
        idx.shuffle(&mut rng);
        idx
    }

    /// A step's input on backend `E` (the training backend or its inner one): the batch of pairs
    /// `ids` of `pairs` and, when precomputed, their reference sums from `refs`.
    fn input<E: Backend>(
        &self,
        ids: &[usize],
        pairs: &[TokenizedPair],
        refs: Option<&RefLogps>,
        device: &E::Device,
    ) -> DpoInput<E> {
        let picked: Vec<&TokenizedPair> = ids.iter().map(|&i| &pairs[i]).collect();
        let c = self.config;
        let (pad, max, mode, packing) = (
            self.run.pad_id,
            c.max_length,
            c.truncation_mode,
            c.packing(),
        );
        let (batch, kl_batch) = if c.method.unpaired() {
            let (batch, kl) = collate_kto(&picked, pad, max, mode);
            (batch, Some(kl.to_device::<E>(device, packing)))
        } else {
            (collate(&picked, pad, max, mode), None)
        };
        let ref_logps = refs.map(|r| ref_tensor::<E>(r, ids, device));
        DpoInput {
            batch: batch.to_device::<E>(device, packing),
            kl_batch,
            ref_logps,
        }
    }
}

/// One optimiser step's gradients (averaged over its micro-batches and clipped), its loss, the
/// gradient norm before clipping and the tokens it trained on.
struct StepResult {
    grads: burn::optim::GradientsParams,
    loss: f64,
    grad_norm: f64,
    tokens: usize,
    computed_tokens: usize,
}

/// Runs this replica's share of the micro-batches of one optimiser step, averages the gradients
/// over the replicas, and counts every replica's micro-batches into the log window (in
/// micro-batch order, ranks in order within each).
fn micro_batches<B: TrainBackend, L: BaseLayer<B>>(
    policy: &DpoPolicy<B, L>,
    inputs: &Inputs<'_, B>,
    plan: &StepPlan,
    state: &TrainerState,
    epoch_order: &[usize],
    window: &mut Window,
    observer: &mut dyn TrainObserver,
) -> Result<StepResult, TrainError> {
    let replica = inputs.replica;
    // Dropout draws from the backend's generator: seeding it per step makes a resumed run draw
    // the same masks as an uninterrupted one.
    let mut seed = mix(inputs.config.seed, 1 << 32 | state.global_step as u64);
    if replica.rank > 0 {
        seed = mix(seed, replica.rank as u64);
    }
    B::seed(&inputs.device, seed);
    let group = plan.group(state.batch_in_epoch);
    let train = &inputs.run.train;
    let mut accumulator = GradientsAccumulator::<DpoPolicy<B, L>>::new();
    let mut outputs = Vec::with_capacity(group);
    for b in state.batch_in_epoch..state.batch_in_epoch + group {
        let ids: Vec<usize> = plan
            .shard(b, replica.rank, train.len())
            .map(|p| epoch_order[p])
            .collect();
        let refs = inputs.precomputed.map(|p| &p.0);
        let input = inputs.input::<B>(&ids, train, refs, &inputs.device);
        // The Learner's `train_step` is this same step through burn-train's `TrainStep`, which
        // cannot return an error: the model's own method returns a failed device read as one.
        let output = policy.train_step(input)?;
        accumulator.accumulate(policy, output.grads);
        outputs.push(output.item);
    }
    let grads = replica.average_gradients(policy, accumulator.grads(), &inputs.device)?;
    let replicas = replica.gather::<B::InnerBackend, _>(&outputs, &inputs.inner_device)?;
    let (mut loss, mut tokens, mut computed_tokens) = (0.0, 0, 0);
    for b in 0..group {
        for output in replicas.iter().filter_map(|outputs| outputs.get(b)) {
            loss += output.loss / (group * replica.world) as f64;
            tokens += output.tokens;
            computed_tokens += output.computed_tokens;
            window.add(output);
            observer.on_micro_batch(output);
        }
    }
    let (grads, grad_norm) = average_and_clip(policy, grads, group, inputs.config.max_grad_norm);
    Ok(StepResult {
        grads,
        loss,
        grad_norm,
        tokens,
        computed_tokens,
    })
}

/// Runs the held-out pairs on rank 0 and hands its row to every replica (their early stopping,
/// best-model tracking and plateau schedule follow it).
fn evaluate<B: TrainBackend, L: BaseLayer<B>>(
    policy: &DpoPolicy<B, L>,
    inputs: &Inputs<'_, B>,
    step: usize,
    epoch: f64,
) -> Result<LogRecord, TrainError> {
    let replica = inputs.replica;
    let record = match replica.is_main() {
        true => Some(evaluate_here(policy, inputs, step, epoch)?),
        false => None,
    };
    replica
        .share::<B::InnerBackend, _>(&record, &inputs.inner_device)?
        .ok_or_else(|| TrainError::Collective {
            rank: 0,
            message: "sent no evaluation".into(),
        })
}

/// Runs the held-out pairs through `InferenceStep` on the inner (non-autodiff) backend.
fn evaluate_here<B: TrainBackend, L: BaseLayer<B>>(
    policy: &DpoPolicy<B, L>,
    inputs: &Inputs<'_, B>,
    step: usize,
    epoch: f64,
) -> Result<LogRecord, TrainError> {
    let (run, config) = (inputs.run, inputs.config);
    let inner = policy.valid();
    let device = inner.model.embed_tokens.weight.device();
    let mut records = PairRecords::default();
    let mut loss_sum = 0.0;
    let started = Instant::now();
    let mut tokens = 0;
    let bs = config.per_device_eval_batch_size;
    for (c, chunk) in run.eval.chunks(bs).enumerate() {
        let ids: Vec<usize> = (c * bs..c * bs + chunk.len()).collect();
        let refs = inputs.precomputed.map(|p| &p.1);
        let input = inputs.input::<B::InnerBackend>(&ids, &run.eval, refs, &device);
        let out = inner.infer(input)?;
        loss_sum += out.loss * chunk.len() as f64;
        tokens += out.tokens;
        records.extend(&out.records);
    }
    let mut values = records.metrics_of(config.method, config.beta);
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
fn precompute<B: TrainBackend, L: BaseLayer<B>>(
    policy: &DpoPolicy<B, L>,
    run: &TrainRun,
    config: &TrainConfig,
    observer: &mut dyn TrainObserver,
) -> Result<(RefLogps, RefLogps), TrainError> {
    let mut reference = policy.valid().model;
    prefer_lora::set_active_adapter(&mut reference, policy.reference.as_deref());
    let mut model = run.model_fingerprint.str("reference");
    if let Some(name) = &policy.reference {
        for (_, layer) in reference.projections() {
            if let Some(ad) = layer.adapter(name) {
                model = model.tensor(ad.a.val())?.tensor(ad.b.val())?;
                if let Some(dora) = &ad.dora {
                    model = model.str("dora").tensor(dora.magnitude.val())?;
                }
            }
        }
    }
    let key = cache_key(model, config, &run.train, &run.eval);
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
    let mut all = compute_ref_logps(&reference, &run.train, run.pad_id, config)?;
    all.extend(compute_ref_logps(
        &reference, &run.eval, run.pad_id, config,
    )?);
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

/// Copies the files of directory `from` into `to` through a temporary sibling renamed into place.
fn copy_dir_atomically(from: &Path, to: &Path) -> Result<(), TrainError> {
    let err = |path: &Path, e: std::io::Error| TrainError::Checkpoint {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let tmp = to.with_extension(format!("tmp{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| err(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| err(&tmp, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| err(from, e))? {
        let entry = entry.map_err(|e| err(from, e))?;
        let target = tmp.join(entry.file_name());
        std::fs::copy(entry.path(), &target).map_err(|e| err(&entry.path(), e))?;
    }
    if to.exists() {
        std::fs::remove_dir_all(to).map_err(|e| err(to, e))?;
    }
    std::fs::rename(&tmp, to).map_err(|e| err(to, e))
}

/// Whether `path` looks like a checkpoint directory.
pub fn is_checkpoint(path: &Path) -> bool {
    path.join("trainer_state.json").is_file() && path.join("adapter").is_dir()
}
