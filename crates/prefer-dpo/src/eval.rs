//! Evaluating a policy against a reference on preference pairs: losses and TRL's metrics.

use burn::tensor::{Tensor, TensorData, Transaction, backend::Backend};
use prefer_llama::{LinearLayer, LlamaModel};

use crate::{
    data::{BadRow, DpoBatch, Packing, check_labels, check_vocab},
    host::{DeviceReadError, read, values},
    logps::{LogpsExtras, SequenceLogps, sequence_logps, sequence_logps_with},
    loss::{
        FDivergenceType, LossConfig, Method, PairLogps, PolicyPairs, dpo_loss, kto_kl, kto_losses,
        reference_free_loss, wpo_weights,
    },
    metrics::PairRecords,
};

/// The loss of one batch and its per-pair values.
#[derive(Debug, Clone)]
pub struct BatchEval<B: Backend> {
    /// The (weighted) loss, one element; differentiable with respect to the policy.
    pub loss: Tensor<B, 1>,
    /// The per-pair inputs of the loss.
    pub pairs: PairLogps<B>,
    /// Policy log-prob results of the batch's rows.
    pub policy: SequenceLogps<B>,
    /// The chosen and the rejected rows' logit sums (for `logits/*`), `[P]` each.
    pub logit_sums: (Tensor<B, 1>, Tensor<B, 1>),
    /// A reference-free method's NLL term per pair: the summed NLL and its tokens, `[P]` each.
    pub nll: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
    /// KTO's loss of each example, `[P]` (its mean is `loss`); `None` for pairs.
    pub per_example: Option<Tensor<B, 1>>,
    /// KTO's labels, one per example (empty for pairs).
    pub labels: Vec<bool>,
}

/// Computes the loss of `batch` with `policy`, taking the reference log-probs from `reference`.
pub fn evaluate_batch<B: prefer_kernels::PreferBackend, L: LinearLayer<B>>(
    config: &LossConfig,
    policy: &LlamaModel<B, L>,
    reference: &LlamaModel<B, L>,
    batch: &DpoBatch<B>,
) -> BatchEval<B> {
    if !config.method.uses_reference() {
        return evaluate_reference_free(config, policy, batch);
    }
    let ref_sums = sequence_logps(reference, batch)
        .logps(config.ld_alpha)
        .detach();
    evaluate_batch_with(config, policy, ref_sums, batch)
}

/// Computes the loss of `batch` with `policy` against given reference sums `[2P]` (detached; rows
/// in the batch's `[chosen.., rejected..]` order).
pub fn evaluate_batch_with<B: prefer_kernels::PreferBackend, L: LinearLayer<B>>(
    config: &LossConfig,
    policy: &LlamaModel<B, L>,
    ref_sums: Tensor<B, 1>,
    batch: &DpoBatch<B>,
) -> BatchEval<B> {
    if config.method == Method::Kto {
        return evaluate_kto(config, policy, ref_sums, batch, None);
    }
    let extras = LogpsExtras {
        log_sum_sq_probs: config.use_weighting,
        ..Default::default()
    };
    let pol = sequence_logps_with(policy, batch, extras);
    let (chosen, rejected) = SequenceLogps::split(pol.logps(config.ld_alpha));
    let (chosen_unweighted, _) = SequenceLogps::split(pol.sums.clone());
    let ref_sums_all = ref_sums.clone();
    let (ref_chosen, ref_rejected) = SequenceLogps::split(ref_sums);
    let (chosen_tokens, rejected_tokens) = SequenceLogps::split(pol.tokens.clone());
    let pairs = PairLogps {
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        chosen_tokens,
        rejected_tokens,
        chosen_unweighted,
        weights: wpo_weights(&pol),
    };
    // The plain sigmoid loss (TRL's default) runs as one fused kernel from the token log-probs.
    let plain = config.ld_alpha.is_none()
        && config.f_divergence.kind == FDivergenceType::ReverseKl
        && !config.use_weighting;
    let mut losses = config.weighted();
    let loss = match (losses.next(), losses.next()) {
        (Some((crate::loss::LossType::Sigmoid, weight)), None) if plain => {
            prefer_kernels::dpo_sigmoid_loss(
                pol.token_logps.clone(),
                pol.mask.clone(),
                ref_sums_all,
                config.beta,
                config.label_smoothing,
            )
            .loss
            .mean()
                * weight
        }
        _ => dpo_loss(config, &pairs),
    };
    BatchEval {
        loss,
        pairs,
        logit_sums: SequenceLogps::split(pol.logit_sums.clone()),
        policy: pol,
        nll: None,
        per_example: None,
        labels: Vec::new(),
    }
}

/// The policy's values on KTO's KL completions, `[P]` each, without gradients: they only set the
/// reference point.
#[derive(Debug, Clone)]
pub struct KlValues<B: Backend> {
    /// Log-prob sums.
    pub sums: Tensor<B, 1>,
    /// Completion tokens.
    pub tokens: Tensor<B, 1>,
    /// Logit sums (for `logits/*`).
    pub logit_sums: Tensor<B, 1>,
}

impl<B: Backend> KlValues<B> {
    /// The values of a forward pass over the KL completions, detached.
    pub fn of(s: SequenceLogps<B>) -> Self {
        Self {
            sums: s.sums.detach(),
            tokens: s.tokens,
            logit_sums: s.logit_sums.detach(),
        }
    }

    /// The values moved to another backend (the inner backend's onto the autodiff one).
    pub fn map<E: Backend>(self, f: impl Fn(Tensor<B, 1>) -> Tensor<E, 1>) -> KlValues<E> {
        KlValues {
            sums: f(self.sums),
            tokens: f(self.tokens),
            logit_sums: f(self.logit_sums),
        }
    }
}

/// Computes KTO's loss of a batch of examples: rows `[completions.., KL completions..]`, or — with
/// `kl`, as the trainer runs them — the completions alone, with the policy's values on the KL
/// completions computed apart, so that the backward pass only runs over the rows that take
/// gradients. The reference sums `[2P]` are in `[completions.., KL completions..]` order
/// (detached). In the records, `chosen` holds the completions and `rejected` the KL completions.
pub fn evaluate_kto<B: prefer_kernels::PreferBackend, L: LinearLayer<B>>(
    config: &LossConfig,
    policy: &LlamaModel<B, L>,
    ref_sums: Tensor<B, 1>,
    batch: &DpoBatch<B>,
    kl: Option<KlValues<B>>,
) -> BatchEval<B> {
    let pol = sequence_logps(policy, batch);
    let ((completion, kl_rows), (chosen_tokens, rejected_tokens), logit_sums) = match kl {
        Some(kl) => (
            (pol.sums.clone(), kl.sums),
            (pol.tokens.clone(), kl.tokens),
            (pol.logit_sums.clone(), kl.logit_sums),
        ),
        None => {
            let halves = |t: &Tensor<B, 1>| {
                let (a, b) = SequenceLogps::split(t.clone());
                (a, b.detach())
            };
            (
                halves(&pol.sums),
                halves(&pol.tokens),
                halves(&pol.logit_sums),
            )
        }
    };
    let (ref_completion, ref_kl_rows) = SequenceLogps::split(ref_sums);
    let kl = kto_kl(kl_rows.clone(), ref_kl_rows.clone());
    let device = completion.device();
    let desirable: Vec<f32> = batch
        .labels
        .iter()
        .map(|&l| f32::from(u8::from(l)))
        .collect();
    let n = desirable.len();
    let desirable = Tensor::from_data(TensorData::new(desirable, [n]), &device);
    let per_example = kto_losses(
        config,
        completion.clone() - ref_completion.clone(),
        kl,
        desirable,
    );
    BatchEval {
        loss: per_example.clone().mean(),
        pairs: PairLogps {
            chosen: completion.clone(),
            rejected: kl_rows,
            ref_chosen: ref_completion,
            ref_rejected: ref_kl_rows,
            chosen_tokens,
            rejected_tokens,
            chosen_unweighted: completion,
            weights: None,
        },
        logit_sums,
        policy: pol,
        nll: None,
        per_example: Some(per_example),
        labels: batch.labels.clone(),
    }
}

/// Computes the loss of `batch` under a reference-free method (CPO, SimPO, ORPO): the policy's
/// log-probs alone, no reference run. The pairs' reference values are 0, so the rewards TRL logs
/// for these trainers (β × the policy's log-probs) come out of the same metrics.
pub fn evaluate_reference_free<B: prefer_kernels::PreferBackend, L: LinearLayer<B>>(
    config: &LossConfig,
    policy: &LlamaModel<B, L>,
    batch: &DpoBatch<B>,
) -> BatchEval<B> {
    let extras = LogpsExtras {
        chosen_prompt_logps: config.method == Method::Orpo,
        ..Default::default()
    };
    let pol = sequence_logps_with(policy, batch, extras);
    let (sum_c, sum_r) = SequenceLogps::split(pol.sums.clone());
    let (tokens_c, tokens_r) = SequenceLogps::split(pol.tokens.clone());
    let (chosen, rejected) = if config.averages_logps() {
        (sum_c.clone() / tokens_c.clone(), sum_r / tokens_r.clone())
    } else {
        (sum_c.clone(), sum_r)
    };
    let (nll, nll_tokens) = match &pol.chosen_prompt {
        Some((prompt_sum, prompt_tokens)) => (
            (sum_c.clone() + prompt_sum.clone()).neg(),
            tokens_c.clone() + prompt_tokens.clone(),
        ),
        None => (sum_c.clone().neg(), tokens_c.clone()),
    };
    let x = PolicyPairs {
        chosen: chosen.clone(),
        rejected: rejected.clone(),
        nll: nll.clone(),
        nll_tokens: nll_tokens.clone(),
    };
    let loss = reference_free_loss(config, &x);
    let zeros = chosen.zeros_like();
    BatchEval {
        loss,
        pairs: PairLogps {
            chosen,
            rejected,
            ref_chosen: zeros.clone(),
            ref_rejected: zeros,
            chosen_tokens: tokens_c,
            chosen_unweighted: sum_c,
            rejected_tokens: tokens_r,
            weights: None,
        },
        logit_sums: SequenceLogps::split(pol.logit_sums.clone()),
        policy: pol,
        nll: Some((nll, nll_tokens)),
        per_example: None,
        labels: Vec::new(),
    }
}

/// Why `evaluate_pairs` could not finish.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A pair cannot be run (a token id beyond the model's vocabulary).
    #[error(transparent)]
    Data(#[from] BadRow),
    /// A result could not be read back from the device.
    #[error(transparent)]
    Device(#[from] DeviceReadError),
}

impl<B: Backend> BatchEval<B> {
    /// The per-pair values on the host, for metrics: one read from the device for all eight (ten
    /// with a reference-free method's NLL).
    pub fn records(&self) -> Result<PairRecords, DeviceReadError> {
        let (cl, rl) = self.logit_sums.clone();
        let p = &self.pairs;
        let mut read = Transaction::default()
            .register(p.chosen.clone())
            .register(p.rejected.clone())
            .register(p.ref_chosen.clone())
            .register(p.ref_rejected.clone())
            .register(p.chosen_tokens.clone())
            .register(p.rejected_tokens.clone())
            .register(cl)
            .register(rl);
        if let Some((nll, tokens)) = &self.nll {
            read = read.register(nll.clone()).register(tokens.clone());
        }
        let data = read
            .try_execute()
            .map_err(|e| DeviceReadError::new(RECORDS, format!("{e:?}")))?;
        let mut records = records_from_data(data)?;
        records.labels = self.labels.clone();
        Ok(records)
    }

    /// Each pair's loss, `[P]`: the configured DPO losses; when the batch was evaluated by a
    /// reference-free method (which sets `nll`), that method's loss of the pair alone, with its own
    /// NLL; under KTO, each example's loss against its batch's KL. What `prefer eval` reports per
    /// pair.
    pub fn per_pair_loss(&self, config: &LossConfig) -> Tensor<B, 1> {
        if let Some(per_example) = &self.per_example {
            return per_example.clone();
        }
        match &self.nll {
            Some((nll, tokens)) => crate::loss::method::per_pair_reference_free_loss(
                config,
                &PolicyPairs {
                    chosen: self.pairs.chosen.clone(),
                    rejected: self.pairs.rejected.clone(),
                    nll: nll.clone(),
                    nll_tokens: tokens.clone(),
                },
            ),
            _ => crate::loss::per_pair_weighted_loss(config, &self.pairs),
        }
    }
}

const RECORDS: &str = "per-pair values";

/// The eight per-pair vectors of [`BatchEval::records`] (ten with a reference-free method's NLL
/// and its tokens), in the order registered there, checked: each must read back whole and all
/// must have one value per pair.
pub fn records_from_data(mut data: Vec<TensorData>) -> Result<PairRecords, DeviceReadError> {
    let n = data.len();
    let v = |d| values::<f64>(d, RECORDS);
    let (nll, nll_tokens) = match n {
        10 => {
            let tokens = data.pop().map(v).transpose()?.unwrap_or_default();
            let nll = data.pop().map(v).transpose()?.unwrap_or_default();
            (nll, tokens)
        }
        _ => (Vec::new(), Vec::new()),
    };
    let [c, r, rc, rr, ct, rt, cl, rl]: [TensorData; 8] = data.try_into().map_err(|_| {
        DeviceReadError::new(RECORDS, format!("{n} tensors read instead of 8 or 10"))
    })?;
    let records = PairRecords {
        nll,
        nll_tokens,
        chosen: v(c)?,
        rejected: v(r)?,
        ref_chosen: v(rc)?,
        ref_rejected: v(rr)?,
        chosen_tokens: v(ct)?,
        rejected_tokens: v(rt)?,
        chosen_logit_sums: v(cl)?,
        rejected_logit_sums: v(rl)?,
        labels: Vec::new(),
    };
    let pairs = records.chosen.len();
    let mut lengths = vec![
        records.rejected.len(),
        records.ref_chosen.len(),
        records.ref_rejected.len(),
        records.chosen_tokens.len(),
        records.rejected_tokens.len(),
        records.chosen_logit_sums.len(),
        records.rejected_logit_sums.len(),
    ];
    if !records.nll.is_empty() {
        lengths.extend([records.nll.len(), records.nll_tokens.len()]);
    }
    if lengths.iter().any(|&l| l != pairs) {
        return Err(DeviceReadError::new(
            RECORDS,
            format!("vectors of different lengths ({pairs} and {lengths:?})"),
        ));
    }
    Ok(records)
}

/// How `evaluate_pairs` reads and batches data.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalOptions {
    /// Loss options.
    pub loss: LossConfig,
    /// Pairs per batch.
    pub batch_size: usize,
    /// Longest prompt+completion sequence (`max_length`).
    pub max_length: Option<usize>,
    /// Which end of a long sequence to keep.
    pub truncation_mode: crate::data::TruncationMode,
    /// Padded or padding-free batches (the same numbers either way).
    pub packing: Packing,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            loss: LossConfig::default(),
            batch_size: 4,
            max_length: Some(1024),
            truncation_mode: Default::default(),
            packing: Packing::Padded,
        }
    }
}

/// One pair's numbers. Under KTO a pair is an example: `chosen` is its completion, `rejected`
/// its KL completion, and `label` says whether it is desirable.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PairResult {
    /// KTO: whether the example is desirable (absent for pairs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<bool>,
    /// Policy log-prob of the chosen completion.
    #[serde(rename = "logps/chosen")]
    pub chosen: f64,
    /// Policy log-prob of the rejected completion.
    #[serde(rename = "logps/rejected")]
    pub rejected: f64,
    /// Reference log-prob of the chosen completion.
    #[serde(rename = "ref_logps/chosen")]
    pub ref_chosen: f64,
    /// Reference log-prob of the rejected completion.
    #[serde(rename = "ref_logps/rejected")]
    pub ref_rejected: f64,
    /// The pair's (weighted) loss.
    pub loss: f64,
}

/// Metrics over all pairs plus each pair's numbers.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EvalReport {
    /// TRL's metric names, `loss` included.
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// Per pair, in input order.
    pub pairs: Vec<PairResult>,
}

/// Evaluates tokenised pairs: batches of `batch_size`, the policy against the reference. Under
/// KTO the pairs are [`crate::data::kto_pairs`] made with the same `batch_size`, so that each
/// batch holds its own KL completions.
pub fn evaluate_pairs<B: prefer_kernels::PreferBackend, L: LinearLayer<B>>(
    policy: &LlamaModel<B, L>,
    reference: &LlamaModel<B, L>,
    pairs: &[crate::data::TokenizedPair],
    pad_id: u32,
    options: &EvalOptions,
) -> Result<EvalReport, EvalError> {
    check_vocab(pairs, pad_id, policy.config.vocab_size)?;
    if options.loss.method == Method::Kto {
        check_labels(pairs)?;
    }
    let device = policy.embed_tokens.weight.device();
    let mut records = PairRecords::default();
    let mut results = Vec::with_capacity(pairs.len());
    let mut loss_sum = 0.0;
    for chunk in pairs.chunks(options.batch_size.max(1)) {
        let refs: Vec<_> = chunk.iter().collect();
        let batch =
            crate::data::collate(&refs, pad_id, options.max_length, options.truncation_mode)
                .to_device::<B>(&device, options.packing);
        let out = evaluate_batch(&options.loss, policy, reference, &batch);
        let per_pair: Vec<f64> = read(out.per_pair_loss(&options.loss), "per-pair losses")?;
        let loss: Vec<f64> = read(out.loss.clone(), "the loss")?;
        loss_sum += loss.first().copied().unwrap_or(f64::NAN) * chunk.len() as f64;
        let r = out.records()?;
        for (i, loss) in per_pair.into_iter().enumerate() {
            results.push(PairResult {
                label: r.labels.get(i).copied(),
                chosen: r.chosen[i],
                rejected: r.rejected[i],
                ref_chosen: r.ref_chosen[i],
                ref_rejected: r.ref_rejected[i],
                loss,
            });
        }
        records.extend(&r);
    }
    let mut metrics = records.metrics_of(options.loss.method, options.loss.beta);
    // The batches' losses, each weighted by its pairs: as the trainer's evaluation and TRL's
    // (a reference-free method's NLL is a mean over each batch's tokens, not over pairs).
    metrics.insert("loss".into(), loss_sum / results.len().max(1) as f64);
    Ok(EvalReport {
        metrics,
        pairs: results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(v: &[f64]) -> TensorData {
        TensorData::new(v.to_vec(), [v.len()])
    }

    #[test]
    fn per_pair_values_that_do_not_read_back_whole_are_an_error() {
        let whole: Vec<TensorData> = (0..8).map(|_| column(&[1.0, 2.0])).collect();
        assert_eq!(records_from_data(whole).unwrap().chosen, [1.0, 2.0]);
        // One tensor missing: an error, not a record with an empty column.
        let short: Vec<TensorData> = (0..7).map(|_| column(&[1.0, 2.0])).collect();
        assert!(records_from_data(short).is_err());
        // A column of another length would misalign pairs and metrics.
        let mut uneven: Vec<TensorData> = (0..7).map(|_| column(&[1.0, 2.0])).collect();
        uneven.push(column(&[1.0]));
        let err = records_from_data(uneven).unwrap_err();
        assert!(err.to_string().contains("per-pair values"), "{err}");
    }
}
