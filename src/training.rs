//! A training run from a [`RunConfig`]: open the checkpoint, load and tokenise the data, build the
//! (NF4 or dense) base with a LoRA adapter, choose the reference, and train on the chosen backend.
//! This is what `prefer train` does; programs that embed prefer call [`train_from_config`].

use std::path::PathBuf;

use burn::{backend::Autodiff, module::AutodiffModule, tensor::backend::Backend};
use prefer_dpo::{
    data::{
        BadRow, OnBadRow, TokenizeOptions, TokenizedPair, drop_truncated_away, kto_pairs,
        load_examples, load_files, split_train_eval, tokenize_examples, tokenize_rows,
    },
    train::{
        BaseLayer, Fingerprint, LogRecord, Machines, ReferenceSource, Resume, TrainConfig,
        TrainError, TrainObserver, TrainRun, TrainSummary, compute_ref_logps, train_on_machines,
    },
};
use prefer_kernels::PreferBackend;
use prefer_llama::{ChatTokenizer, Checkpoint, DenseFactory, LinearFactory};
use prefer_lora::{LoraConfig, LoraFactory, load_peft};
use prefer_quant::Nf4Factory;

use crate::{
    backend::{BackendError, BackendJob, BackendKind, run_on},
    data_source::{data_files, has_dataset_split},
    run_config::RunConfig,
};

/// How long the machines of a run wait for each other to join (machine 0 may start last).
pub const MACHINES_JOIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Why a run could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum TrainingError {
    /// The backend is missing.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The model could not be loaded.
    #[error(transparent)]
    Load(#[from] prefer_llama::LoadError),
    /// Training failed (bad options, bad data, a diverging run, a file error).
    #[error(transparent)]
    Train(#[from] TrainError),
    /// The data could not be used.
    #[error("{0}")]
    Data(String),
}

impl From<prefer_lora::AdapterError> for TrainingError {
    fn from(e: prefer_lora::AdapterError) -> Self {
        Self::Train(e.into())
    }
}

/// The data of a run, tokenised and checked.
#[derive(Debug, Clone)]
pub struct PreparedData {
    /// Training pairs.
    pub train: Vec<TokenizedPair>,
    /// Held-out pairs.
    pub eval: Vec<TokenizedPair>,
    /// Rows skipped (with `on_bad_row = "skip"`).
    pub skipped: usize,
    /// Padding id.
    pub pad_id: u32,
}

/// Loads `data` (its train split when it is a dataset) and the held-out pairs — `eval_data`, else
/// the dataset's test split, else `eval_ratio` of `data` — and tokenises them with the checkpoint's
/// tokenizer; bad rows stop the run or are skipped as `on_bad_row` says. Under KTO the rows are
/// unpaired examples (or pairs, split in two), each carrying its KL completion.
pub fn prepare_data(
    config: &RunConfig,
    tokenizer: &ChatTokenizer,
    pad_id: u32,
) -> Result<PreparedData, TrainingError> {
    let data = config
        .data
        .as_ref()
        .ok_or_else(|| TrainingError::Data("config: `data` is not set".into()))?;
    let t = &config.train;
    let opts = TokenizeOptions {
        max_prompt_length: t.max_prompt_length,
        max_completion_length: t.max_completion_length,
    };
    let dataset_config = config.dataset_config.as_deref();
    let mut bad = BadRows {
        policy: config.on_bad_row,
        skipped: 0,
    };
    let (train, eval) = if t.method.unpaired() {
        let (train, eval) = splits(config, data, |path, split| {
            let files = data_files(path, dataset_config, split).map_err(TrainingError::Data)?;
            let loaded = load_examples(&files, None)
                .and_then(|l| l.check(bad.policy))
                .map_err(|e| TrainingError::Data(e.to_string()))?;
            bad.skipped += loaded.bad.len();
            let (examples, rejected) = tokenize_examples(tokenizer, &loaded.rows, opts);
            bad.settle(rejected)?;
            Ok(examples)
        })?;
        // TRL rotates the KL completions of both splits within training-batch-sized chunks.
        let mut kto = |examples| {
            let batch = t.per_device_train_batch_size;
            let (pairs, dropped) = kto_pairs(examples, t.max_length, t.truncation_mode, batch);
            bad.settle(dropped).map(|()| pairs)
        };
        (kto(train)?, kto(eval)?)
    } else {
        splits(config, data, |path, split| {
            let files = data_files(path, dataset_config, split).map_err(TrainingError::Data)?;
            let loaded = load_files(&files, None)
                .and_then(|l| l.check(bad.policy))
                .map_err(|e| TrainingError::Data(e.to_string()))?;
            bad.skipped += loaded.bad.len();
            let (pairs, rejected) = tokenize_rows(tokenizer, &loaded.rows, opts);
            bad.settle(rejected)?;
            let (pairs, dropped) = drop_truncated_away(pairs, t.max_length, t.truncation_mode);
            bad.settle(dropped)?;
            Ok(pairs)
        })?
    };
    if train.is_empty() {
        let what = if t.method.unpaired() {
            "examples"
        } else {
            "pairs"
        };
        return Err(TrainingError::Data(format!(
            "{}: no usable training {what}",
            data.display()
        )));
    }
    Ok(PreparedData {
        train,
        eval,
        skipped: bad.skipped,
        pad_id,
    })
}

/// The bad-row policy and the count of rows it skipped.
struct BadRows {
    policy: OnBadRow,
    skipped: usize,
}

impl BadRows {
    /// Stops at the first bad row, or counts them all as skipped.
    fn settle(&mut self, bad: Vec<BadRow>) -> Result<(), TrainingError> {
        if let (OnBadRow::Error, Some(b)) = (self.policy, bad.first()) {
            return Err(TrainingError::Data(b.to_string()));
        }
        self.skipped += bad.len();
        Ok(())
    }
}

/// The training rows and the held-out ones: `eval_data`, else the dataset's test split, else
/// `eval_ratio` of the training rows (seeded), else none.
fn splits<T: Clone>(
    config: &RunConfig,
    data: &PathBuf,
    mut load: impl FnMut(&PathBuf, &str) -> Result<Vec<T>, TrainingError>,
) -> Result<(Vec<T>, Vec<T>), TrainingError> {
    let (train_split, test_split) = (&config.dataset_train_split, &config.dataset_test_split);
    let dataset_config = config.dataset_config.as_deref();
    let all = load(data, train_split)?;
    let has_test_split = || has_dataset_split(data, dataset_config, test_split);
    Ok(match &config.eval_data {
        Some(path) => (all, load(path, test_split)?),
        None if has_test_split().map_err(TrainingError::Data)? => (all, load(data, test_split)?),
        None if config.eval_ratio > 0.0 => {
            split_train_eval(&all, config.eval_ratio, config.train.seed)
        }
        None => (all, Vec::new()),
    })
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainingOutcome {
    /// The trainer's summary.
    pub summary: TrainSummary,
    /// The evaluation before the first step (with `eval_on_start`).
    pub before: Option<LogRecord>,
    /// Pairs trained on and held out.
    pub pairs: (usize, usize),
    /// Rows skipped as bad.
    pub skipped: usize,
    /// The backend it ran on.
    pub backend: BackendKind,
}

/// Runs `config` on its backend, reporting progress to `observer`.
pub fn train_from_config(
    config: &RunConfig,
    resume: Option<Resume>,
    observer: &mut dyn TrainObserver,
) -> Result<TrainingOutcome, TrainingError> {
    config.validate().map_err(TrainError::from)?;
    let kind = config.backend;
    // Padding-free batches are faster on the CPU backends; elsewhere TRL's padded default stays
    // until measured.
    let mut config = config.clone();
    config.train.padding_free.get_or_insert(kind.is_cpu());
    let job = TrainJob {
        config: &config,
        resume,
        observer,
    };
    let mut outcome = run_on(kind, job)??;
    outcome.backend = kind;
    Ok(outcome)
}

struct TrainJob<'a> {
    config: &'a RunConfig,
    resume: Option<Resume>,
    observer: &'a mut dyn TrainObserver,
}

impl BackendJob for TrainJob<'_> {
    type Output = Result<TrainingOutcome, TrainingError>;

    fn run<B: PreferBackend>(self, device: B::Device) -> Self::Output {
        let c = self.config;
        let model = c
            .model
            .as_ref()
            .ok_or_else(|| TrainingError::Data("config: `model` is not set".into()))?;
        let mut ckpt = Checkpoint::open_revision(model, &c.model_revision)?;
        let tokenizer = ckpt.tokenizer.clone().ok_or_else(|| {
            TrainingError::Data(format!("{}: the model has no tokenizer", model.display()))
        })?;
        let pad = ckpt
            .config
            .pad_token_id
            .or_else(|| {
                tokenizer
                    .pad_token
                    .as_deref()
                    .and_then(|t| tokenizer.token_id(t))
            })
            .or_else(|| ckpt.config.eos_token_ids.first().copied())
            .unwrap_or(0);
        // Data first: bad rows stop the run before any model work.
        let data = prepare_data(c, &tokenizer, pad)?;
        // The base's numbers depend on how it is stored: the reference cache key says so.
        if ckpt.is_bnb_4bit() || c.train.load_in_4bit {
            let inner = Nf4Factory {
                blocksize: 64,
                double_quant: c.train.bnb_4bit_use_double_quant,
            };
            let base = format!(
                "nf4 blocksize={} double_quant={} prequantised={}",
                inner.blocksize,
                inner.double_quant,
                ckpt.is_bnb_4bit()
            );
            run_with::<B, _>(self, &mut ckpt, inner, &base, data, device)
        } else {
            run_with::<B, _>(self, &mut ckpt, DenseFactory, "dense", data, device)
        }
    }
}

fn run_with<B, F>(
    job: TrainJob<'_>,
    ckpt: &mut Checkpoint,
    inner: F,
    base: &str,
    data: PreparedData,
    device: B::Device,
) -> Result<TrainingOutcome, TrainingError>
where
    B: PreferBackend,
    F: LinearFactory<Autodiff<B>> + LinearFactory<B> + Clone,
    <F as LinearFactory<Autodiff<B>>>::Layer: BaseLayer<Autodiff<B>>
        + AutodiffModule<Autodiff<B>, InnerModule = <F as LinearFactory<B>>::Layer>,
{
    let run_config = job.config;
    let c = &run_config.train;
    let lora = c.lora().map_err(TrainError::from)?;
    // The adapter's initialisation draws from the backend's generator.
    <Autodiff<B> as Backend>::seed(&device, c.seed);
    let factory = LoraFactory {
        inner: inner.clone(),
        config: if run_config.adapter.is_some() {
            LoraConfig {
                target_modules: vec![],
                ..lora.clone()
            }
        } else {
            lora.clone()
        },
        adapter_name: "default".into(),
    };
    let mut model = ckpt.build::<Autodiff<B>, _>(&factory, &device)?;
    // Starting from an adapter: its rank, scaling and targets are what is trained and saved.
    let adopted;
    let c = match &run_config.adapter {
        Some(dir) => {
            let loaded = load_peft(&mut model, dir, "default")?;
            if loaded.r != lora.r
                || loaded.target_modules != lora.target_modules
                || loaded.scaling() != lora.scaling()
                || loaded.use_dora != lora.use_dora
            {
                job.observer.on_message(&format!(
                    "training the adapter in {} with its own r = {}, lora_alpha = {}, \
                     use_dora = {} and target_modules (the config's are for fresh adapters)",
                    dir.display(),
                    loaded.r,
                    loaded.lora_alpha,
                    loaded.use_dora
                ));
            }
            adopted = TrainConfig {
                r: loaded.r,
                lora_alpha: loaded.lora_alpha,
                use_rslora: loaded.use_rslora,
                use_dora: loaded.use_dora,
                target_modules: loaded
                    .target_modules
                    .iter()
                    .map(|p| p.hf_name().to_string())
                    .collect(),
                ..c.clone()
            };
            &adopted
        }
        None => c,
    };
    let mut fingerprint = Fingerprint::default().path(&ckpt.path).str(base);
    let reference = match &run_config.ref_model {
        Some(path) => {
            let mut rckpt = Checkpoint::open(path)?;
            fingerprint = fingerprint.path(path);
            let bare = LoraFactory::without_adapters(inner);
            let reference = rckpt.build::<B, _>(&bare, &device)?;
            job.observer.on_message(&format!(
                "computing reference log-probs with {}",
                path.display()
            ));
            let train = compute_ref_logps(&reference, &data.train, data.pad_id, c)?;
            let eval = compute_ref_logps(&reference, &data.eval, data.pad_id, c)?;
            ReferenceSource::Precomputed { train, eval }
        }
        None => ReferenceSource::Snapshot,
    };
    let pairs = (data.train.len(), data.eval.len());
    let run = TrainRun {
        train: data.train,
        eval: data.eval,
        pad_id: data.pad_id,
        reference,
        // A Hub id stays an id in the adapter's config, as PEFT writes it.
        base_model: Some(match &run_config.model {
            Some(m) if !m.exists() => m.display().to_string(),
            _ => ckpt.path.display().to_string(),
        }),
        model_fingerprint: fingerprint,
        resume: job.resume,
    };
    let devices = run_config
        .devices
        .resolve(run_config.backend, &device)
        .map_err(TrainingError::Data)?;
    let machines = Machines {
        num_machines: run_config.num_machines,
        machine_rank: run_config.machine_rank,
        main_process_ip: run_config.main_process_ip.clone(),
        main_process_port: run_config.main_process_port,
        join_timeout: MACHINES_JOIN_TIMEOUT,
    };
    let summary = train_on_machines(model, &devices, &machines, run, c, job.observer)?;
    let before = summary
        .history
        .iter()
        .find(|r| r.step == 0 && r.is_eval())
        .cloned();
    Ok(TrainingOutcome {
        summary,
        before,
        pairs,
        skipped: data.skipped,
        backend: BackendKind::Ndarray,
    })
}
