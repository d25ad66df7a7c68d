//! Evaluating a policy against a reference on preference pairs: losses and TRL's metrics.

use burn::tensor::{Tensor, TensorData, Transaction, backend::Backend};
use prefer_llama::{LinearLayer, LlamaModel};

use crate::{
    data::{BadRow, DpoBatch, Packing, check_vocab},
    host::{DeviceReadError, read, values},
    logps::{LogpsExtras, SequenceLogps, sequence_logps, sequence_logps_with},
    loss::{FDivergenceType, LossConfig, PairLogps, dpo_loss, wpo_weights},
    metrics::PairRecords,
};

/// The loss of one batch and its per-pair values.
#[derive(Debug, Clone)]
pub struct BatchEval<B: Backend> {
    /// The (weighted) loss, one element; differentiable with respect to the policy.
    pub loss: Tensor<B, 1>,
    /// The per-pair inputs of the loss.
    pub pairs: PairLogps<B>,
    /// Policy log-prob results (for `logits/*`).
    pub policy: SequenceLogps<B>,
}

/// Computes the loss of `batch` with `policy`, taking the reference log-probs from `reference`.
pub fn evaluate_batch<B: prefer_kernels::PreferBackend, L: LinearLayer<B>>(
    config: &LossConfig,
    policy: &LlamaModel<B, L>,
    reference: &LlamaModel<B, L>,
    batch: &DpoBatch<B>,
) -> BatchEval<B> {
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
    let extras = LogpsExtras {
        log_sum_sq_probs: config.use_weighting,
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
        policy: pol,
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
    /// The per-pair values on the host, for metrics: one read from the device for all eight.
    pub fn records(&self) -> Result<PairRecords, DeviceReadError> {
        let (cl, rl) = SequenceLogps::split(self.policy.logit_sums.clone());
        let p = &self.pairs;
        let data = Transaction::default()
            .register(p.chosen.clone())
            .register(p.rejected.clone())
            .register(p.ref_chosen.clone())
            .register(p.ref_rejected.clone())
            .register(p.chosen_tokens.clone())
            .register(p.rejected_tokens.clone())
            .register(cl)
            .register(rl)
            .try_execute()
            .map_err(|e| DeviceReadError::new(RECORDS, format!("{e:?}")))?;
        records_from_data(data)
    }
}

const RECORDS: &str = "per-pair values";

/// The eight per-pair vectors of [`BatchEval::records`], in the order registered there, checked:
/// each must read back whole and all must have one value per pair.
pub fn records_from_data(data: Vec<TensorData>) -> Result<PairRecords, DeviceReadError> {
    let n = data.len();
    let [c, r, rc, rr, ct, rt, cl, rl]: [TensorData; 8] = data
        .try_into()
        .map_err(|_| DeviceReadError::new(RECORDS, format!("{n} tensors read instead of 8")))?;
    let v = |d| values::<f64>(d, RECORDS);
    let records = PairRecords {
        chosen: v(c)?,
        rejected: v(r)?,
        ref_chosen: v(rc)?,
        ref_rejected: v(rr)?,
        chosen_tokens: v(ct)?,
        rejected_tokens: v(rt)?,
        chosen_logit_sums: v(cl)?,
        rejected_logit_sums: v(rl)?,
    };
    let pairs = records.chosen.len();
    let lengths = [
        records.rejected.len(),
        records.ref_chosen.len(),
        records.ref_rejected.len(),
        records.chosen_tokens.len(),
        records.rejected_tokens.len(),
        records.chosen_logit_sums.len(),
        records.rejected_logit_sums.len(),
    ];
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

/// One pair's numbers.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PairResult {
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

/// Evaluates tokenised pairs: batches of `batch_size`, the policy against the reference.
pub fn evaluate_pairs<B: prefer_kernels::PreferBackend, L: LinearLayer<B>>(
    policy: &LlamaModel<B, L>,
    reference: &LlamaModel<B, L>,
    pairs: &[crate::data::TokenizedPair],
    pad_id: u32,
    options: &EvalOptions,
) -> Result<EvalReport, EvalError> {
    check_vocab(pairs, pad_id, policy.config.vocab_size)?;
    let device = policy.embed_tokens.weight.device();
    let mut records = PairRecords::default();
    let mut results = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(options.batch_size.max(1)) {
        let refs: Vec<_> = chunk.iter().collect();
        let batch =
            crate::data::collate(&refs, pad_id, options.max_length, options.truncation_mode)
                .to_device::<B>(&device, options.packing);
        let out = evaluate_batch(&options.loss, policy, reference, &batch);
        let per_pair: Vec<f64> = read(
            crate::loss::per_pair_weighted_loss(&options.loss, &out.pairs),
            "per-pair losses",
        )?;
        let r = out.records()?;
        for (i, loss) in per_pair.into_iter().enumerate() {
            results.push(PairResult {
                chosen: r.chosen[i],
                rejected: r.rejected[i],
                ref_chosen: r.ref_chosen[i],
                ref_rejected: r.ref_rejected[i],
                loss,
            });
        }
        records.extend(&r);
    }
    let mut metrics = records.metrics(options.loss.beta);
    let n = results.len().max(1) as f64;
    metrics.insert(
        "loss".into(),
        results.iter().map(|p| p.loss).sum::<f64>() / n,
    );
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
