//! What replicas exchange, as flat lists of numbers: the collective engine moves float tensors
//! only, so a step's outputs, an evaluation's row and the precomputed reference log-probs are
//! written as f64 values (counts first, strings as their characters) and read back in order.

use std::collections::BTreeMap;

use super::{metrics_log::LogRecord, step::DpoOutput};
use crate::metrics::PairRecords;

/// A value that can be sent to the other replicas.
pub trait Wire: Sized {
    /// Appends the value's numbers.
    fn encode(&self, out: &mut Vec<f64>);
    /// Reads a value back; `None` when the numbers end early or do not fit.
    fn decode(input: &mut dyn Iterator<Item = f64>) -> Option<Self>;
}

fn count(input: &mut dyn Iterator<Item = f64>) -> Option<usize> {
    let v = input.next()?;
    (v >= 0.0 && v.fract() == 0.0).then_some(v as usize)
}

impl Wire for f64 {
    fn encode(&self, out: &mut Vec<f64>) {
        out.push(*self);
    }
    fn decode(input: &mut dyn Iterator<Item = f64>) -> Option<Self> {
        input.next()
    }
}

impl Wire for usize {
    fn encode(&self, out: &mut Vec<f64>) {
        out.push(*self as f64);
    }
    fn decode(input: &mut dyn Iterator<Item = f64>) -> Option<Self> {
        count(input)
    }
}

impl Wire for bool {
    fn encode(&self, out: &mut Vec<f64>) {
        out.push(f64::from(u8::from(*self)));
    }
    fn decode(input: &mut dyn Iterator<Item = f64>) -> Option<Self> {
        Some(input.next()? != 0.0)
    }
}

impl Wire for f32 {
    fn encode(&self, out: &mut Vec<f64>) {
        out.push(f64::from(*self));
    }
    fn decode(input: &mut dyn Iterator<Item = f64>) -> Option<Self> {
        Some(input.next()? as f32)
    }
}

impl Wire for String {
    fn encode(&self, out: &mut Vec<f64>) {
        out.push(self.chars().count() as f64);
        out.extend(self.chars().map(|c| f64::from(u32::from(c))));
    }
    fn decode(input: &mut dyn Iterator<Item = f64>) -> Option<Self> {
        let n = count(input)?;
        (0..n)
            .map(|_| char::from_u32(input.next()? as u32))
            .collect()
    }
}

impl<A: Wire, B: Wire> Wire for (A, B) {
    fn encode(&self, out: &mut Vec<f64>) {
        self.0.encode(out);
        self.1.encode(out);
    }
    fn decode(input: &mut dyn Iterator<Item = f64>) -> Option<Self> {
        Some((A::decode(input)?, B::decode(input)?))
    }
}

impl<T: Wire> Wire for Vec<T> {
    fn encode(&self, out: &mut Vec<f64>) {
        out.push(self.len() as f64);
        self.iter().for_each(|v| v.encode(out));
    }
    fn decode(input: &mut dyn Iterator<Item = f64>) -> Option<Self> {
        let n = count(input)?;
        (0..n).map(|_| T::decode(input)).collect()
    }
}

impl<T: Wire> Wire for Option<T> {
    fn encode(&self, out: &mut Vec<f64>) {
        self.is_some().encode(out);
        if let Some(v) = self {
            v.encode(out);
        }
    }
    fn decode(input: &mut dyn Iterator<Item = f64>) -> Option<Self> {
        match bool::decode(input)? {
            true => Some(Some(T::decode(input)?)),
            false => Some(None),
        }
    }
}

impl Wire for PairRecords {
    fn encode(&self, out: &mut Vec<f64>) {
        for v in self.columns() {
            v.encode(out);
        }
        self.labels.encode(out);
    }
    fn decode(input: &mut dyn Iterator<Item = f64>) -> Option<Self> {
        let mut r = PairRecords::default();
        for v in r.columns_mut() {
            *v = Vec::decode(input)?;
        }
        r.labels = Vec::decode(input)?;
        Some(r)
    }
}

impl Wire for DpoOutput {
    fn encode(&self, out: &mut Vec<f64>) {
        self.loss.encode(out);
        self.tokens.encode(out);
        self.computed_tokens.encode(out);
        self.records.encode(out);
    }
    fn decode(input: &mut dyn Iterator<Item = f64>) -> Option<Self> {
        Some(DpoOutput {
            loss: f64::decode(input)?,
            tokens: usize::decode(input)?,
            computed_tokens: usize::decode(input)?,
            records: PairRecords::decode(input)?,
        })
    }
}

impl Wire for LogRecord {
    fn encode(&self, out: &mut Vec<f64>) {
        self.step.encode(out);
        self.epoch.encode(out);
        let values: Vec<(String, f64)> = self.values.clone().into_iter().collect();
        values.encode(out);
    }
    fn decode(input: &mut dyn Iterator<Item = f64>) -> Option<Self> {
        Some(LogRecord {
            step: usize::decode(input)?,
            epoch: f64::decode(input)?,
            values: Vec::<(String, f64)>::decode(input)?
                .into_iter()
                .collect::<BTreeMap<_, _>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Wire + PartialEq + std::fmt::Debug>(value: T) {
        let mut out = Vec::new();
        value.encode(&mut out);
        let back = T::decode(&mut out.into_iter());
        assert_eq!(back, Some(value));
    }

    #[test]
    fn outputs_rows_and_reference_values_come_back_equal() {
        let records = PairRecords {
            chosen: vec![-12.375, -3.1],
            rejected: vec![-20.5, f64::NEG_INFINITY],
            ref_chosen: vec![-11.0, -2.0],
            ref_rejected: vec![-19.0, -1.0],
            chosen_tokens: vec![5.0, 7.0],
            rejected_tokens: vec![6.0, 3.0],
            chosen_logit_sums: vec![0.25, -0.5],
            rejected_logit_sums: vec![0.125, 1.5],
            labels: vec![true, false],
            ..Default::default()
        };
        round_trip(DpoOutput {
            loss: 0.693,
            records,
            tokens: 40,
            computed_tokens: 48,
        });
        round_trip(LogRecord {
            step: 3,
            epoch: 0.75,
            values: [
                ("eval_rewards/chosen".to_string(), -0.25),
                ("eval_loss".into(), 0.7),
            ]
            .into_iter()
            .collect(),
        });
        round_trip(Some(vec![(-1.5f32, -2.25f32)]));
        round_trip(None::<Vec<(f32, f32)>>);
        // NaN is carried (it is not equal to itself, so checked apart).
        let mut out = Vec::new();
        f64::NAN.encode(&mut out);
        assert!(f64::decode(&mut out.into_iter()).unwrap().is_nan());
    }

    #[test]
    fn truncated_numbers_do_not_decode() {
        let mut out = Vec::new();
        "loss".to_string().encode(&mut out);
        out.pop();
        assert_eq!(String::decode(&mut out.into_iter()), None);
    }
}
