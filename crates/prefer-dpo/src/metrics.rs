//! The preference metrics under TRL's names, from per-pair values read back to the host.

use std::collections::BTreeMap;

use crate::loss::{Method, orpo_log_odds_metrics};

/// Per-pair values of one or more batches, on the host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PairRecords {
    /// Policy log-prob sums of the chosen completions.
    pub chosen: Vec<f64>,
    /// Policy log-prob sums of the rejected completions.
    pub rejected: Vec<f64>,
    /// Reference sums, chosen.
    pub ref_chosen: Vec<f64>,
    /// Reference sums, rejected.
    pub ref_rejected: Vec<f64>,
    /// Completion tokens, chosen.
    pub chosen_tokens: Vec<f64>,
    /// Completion tokens, rejected.
    pub rejected_tokens: Vec<f64>,
    /// Sum over chosen completion tokens of the token's mean logit (over the vocabulary).
    pub chosen_logit_sums: Vec<f64>,
    /// The same for rejected completions.
    pub rejected_logit_sums: Vec<f64>,
    /// A reference-free method's NLL summed over each chosen sequence's counted tokens (empty
    /// under DPO).
    pub nll: Vec<f64>,
    /// The number of those tokens.
    pub nll_tokens: Vec<f64>,
    /// KTO: whether each example is desirable (empty for pairs). A KTO record's `chosen` is the
    /// example's completion and its `rejected` the KL completion.
    pub labels: Vec<bool>,
}

impl PairRecords {
    /// Appends another batch.
    pub fn extend(&mut self, other: &PairRecords) {
        for (mine, theirs) in self.columns_mut().into_iter().zip(other.columns()) {
            mine.extend(theirs);
        }
        self.labels.extend(&other.labels);
    }

    /// The numeric columns, in declaration order (`labels` apart).
    pub fn columns(&self) -> [&Vec<f64>; 10] {
        [
            &self.chosen,
            &self.rejected,
            &self.ref_chosen,
            &self.ref_rejected,
            &self.chosen_tokens,
            &self.rejected_tokens,
            &self.chosen_logit_sums,
            &self.rejected_logit_sums,
            &self.nll,
            &self.nll_tokens,
        ]
    }

    /// [`PairRecords::columns`], to write.
    pub fn columns_mut(&mut self) -> [&mut Vec<f64>; 10] {
        [
            &mut self.chosen,
            &mut self.rejected,
            &mut self.ref_chosen,
            &mut self.ref_rejected,
            &mut self.chosen_tokens,
            &mut self.rejected_tokens,
            &mut self.chosen_logit_sums,
            &mut self.rejected_logit_sums,
            &mut self.nll,
            &mut self.nll_tokens,
        ]
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.chosen.len()
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.chosen.is_empty()
    }

    /// The metrics of `method`'s trainer in TRL. DPO: [`PairRecords::metrics`]; KTO:
    /// [`PairRecords::kto_metrics`]. CPO, SimPO and
    /// ORPO (whose records hold the policy's log-probs, means where the method uses them, and a
    /// reference of 0): the rewards as β × those log-probs, `logps/*`, `num_pairs`, `logits/*`
    /// (the completion tokens' mean, as DPO's; TRL's CPO and ORPO trainers average every position
    /// of the padded batch, so theirs depend on the padding),
    /// and `nll_loss` (the mean NLL over the window's counted tokens; logged under SimPO too, where
    /// TRL logs 0 when `cpo_alpha` is 0), plus ORPO's `log_odds_ratio` and `log_odds_chosen`;
    /// no `kl`, as there is no reference to drift from.
    pub fn metrics_of(&self, method: Method, beta: f64) -> BTreeMap<String, f64> {
        if method == Method::Kto {
            return self.kto_metrics(beta);
        }
        let mut m = self.metrics(beta);
        if method.uses_reference() {
            return m;
        }
        m.remove("kl");
        let tokens: f64 = self.nll_tokens.iter().sum();
        m.insert(
            "nll_loss".into(),
            self.nll.iter().sum::<f64>() / tokens.max(1.0),
        );
        if method == Method::Orpo {
            let (ratio, chosen) = orpo_log_odds_metrics(&self.chosen, &self.rejected);
            m.insert("log_odds_ratio".into(), ratio);
            m.insert("log_odds_chosen".into(), chosen);
        }
        m
    }

    /// TRL's metrics (`rewards/chosen`, `rewards/rejected`, `rewards/accuracies` with a strict `>`,
    /// `rewards/margins`, `logps/chosen`, `logps/rejected`, `logits/chosen`, `logits/rejected` as
    /// token-weighted means) plus `num_pairs` and `kl`: the mean per-token difference between policy
    /// and reference log-probs over all completion tokens, an estimate of the drift from the reference.
    pub fn metrics(&self, beta: f64) -> BTreeMap<String, f64> {
        let n = self.len() as f64;
        let mean = |v: &[f64]| v.iter().sum::<f64>() / n;
        let rc: Vec<f64> = self
            .chosen
            .iter()
            .zip(&self.ref_chosen)
            .map(|(p, r)| beta * (p - r))
            .collect();
        let rr: Vec<f64> = self
            .rejected
            .iter()
            .zip(&self.ref_rejected)
            .map(|(p, r)| beta * (p - r))
            .collect();
        let acc = rc.iter().zip(&rr).filter(|(c, r)| c > r).count() as f64 / n;
        let margins: Vec<f64> = rc.iter().zip(&rr).map(|(c, r)| c - r).collect();
        let ct: f64 = self.chosen_tokens.iter().sum();
        let rt: f64 = self.rejected_tokens.iter().sum();
        let drift: f64 = self.chosen.iter().chain(&self.rejected).sum::<f64>()
            - self
                .ref_chosen
                .iter()
                .chain(&self.ref_rejected)
                .sum::<f64>();
        BTreeMap::from([
            ("rewards/chosen".into(), mean(&rc)),
            ("rewards/rejected".into(), mean(&rr)),
            ("rewards/accuracies".into(), acc),
            ("rewards/margins".into(), mean(&margins)),
            ("logps/chosen".into(), mean(&self.chosen)),
            ("logps/rejected".into(), mean(&self.rejected)),
            (
                "logits/chosen".into(),
                self.chosen_logit_sums.iter().sum::<f64>() / ct.max(1.0),
            ),
            (
                "logits/rejected".into(),
                self.rejected_logit_sums.iter().sum::<f64>() / rt.max(1.0),
            ),
            ("num_pairs".into(), n),
            ("kl".into(), drift / (ct + rt).max(1.0)),
        ])
    }

    /// KTOTrainer's metrics: `kl`, the reference point `max(0, mean(policy − reference))` over the
    /// KL completions; `rewards/chosen` (β × log-ratio), `logps/chosen` and `logits/chosen` (token-
    /// weighted) over the desirable examples, the same `…/rejected` over the undesirable ones, each
    /// only when there are such examples, and `rewards/margins` when there are both; plus
    /// `num_examples`. TRL averages its per-batch values over a logging window; these pool the
    /// window's examples, which is the same for equal batches but for `kl`'s clamp at 0.
    pub fn kto_metrics(&self, beta: f64) -> BTreeMap<String, f64> {
        let n = self.len();
        let drift: f64 = (0..n)
            .map(|i| self.rejected[i] - self.ref_rejected[i])
            .sum();
        let mut m = BTreeMap::from([
            ("kl".to_string(), (drift / n.max(1) as f64).max(0.0)),
            ("num_examples".to_string(), n as f64),
        ]);
        let mut rewards = [f64::NAN; 2];
        for (slot, (label, side)) in [(true, "chosen"), (false, "rejected")]
            .into_iter()
            .enumerate()
        {
            let idx: Vec<usize> = (0..n)
                .filter(|&i| self.labels.get(i) == Some(&label))
                .collect();
            if idx.is_empty() {
                continue;
            }
            let count = idx.len() as f64;
            let sum = |v: &[f64]| idx.iter().map(|&i| v[i]).sum::<f64>();
            let logratio = sum(&self.chosen) - sum(&self.ref_chosen);
            rewards[slot] = beta * logratio / count;
            m.insert(format!("rewards/{side}"), rewards[slot]);
            m.insert(format!("logps/{side}"), sum(&self.chosen) / count);
            m.insert(
                format!("logits/{side}"),
                sum(&self.chosen_logit_sums) / sum(&self.chosen_tokens).max(1.0),
            );
        }
        if rewards.iter().all(|r| !r.is_nan()) {
            m.insert("rewards/margins".into(), rewards[0] - rewards[1]);
        }
        m
    }
}
