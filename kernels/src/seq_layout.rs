//! How the rows of a token-major batch `[tokens, …]` split into sequences: the cumulative sequence
//! lengths (`cu_seqlens` in FlashAttention's varlen API). A right-padded batch of `B` rows of `T`
//! tokens is `B` sequences of `T`; a padding-free batch packs sequences of different lengths back to
//! back. Attention never crosses a boundary, and positions restart at 0 in every sequence.

use std::sync::Arc;

/// Sequence boundaries of a token-major batch; cheap to clone (shared).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SeqLayout {
    bounds: Arc<[usize]>,
}

impl SeqLayout {
    /// `rows` sequences of `len` tokens each (a padded batch).
    pub fn uniform(rows: usize, len: usize) -> Self {
        Self {
            bounds: (0..=rows).map(|r| r * len).collect(),
        }
    }

    /// Sequences of the given lengths, packed back to back. Empty sequences are allowed.
    pub fn packed(lengths: &[usize]) -> Self {
        let mut bounds = Vec::with_capacity(lengths.len() + 1);
        bounds.push(0);
        for l in lengths {
            bounds.push(bounds[bounds.len() - 1] + l);
        }
        Self {
            bounds: bounds.into(),
        }
    }

    /// Number of sequences.
    pub fn sequences(&self) -> usize {
        self.bounds.len() - 1
    }

    /// Total tokens.
    pub fn tokens(&self) -> usize {
        self.bounds[self.bounds.len() - 1]
    }

    /// `[start, end)` of sequence `i`.
    pub fn range(&self, i: usize) -> std::ops::Range<usize> {
        self.bounds[i]..self.bounds[i + 1]
    }

    /// Every sequence's `[start, end)`.
    pub fn ranges(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        self.bounds.windows(2).map(|w| w[0]..w[1])
    }

    /// The length shared by every sequence, if they all have the same one (and there is one).
    pub fn uniform_len(&self) -> Option<usize> {
        let mut lens = self.bounds.windows(2).map(|w| w[1] - w[0]);
        let first = lens.next()?;
        lens.all(|l| l == first).then_some(first)
    }

    /// Each token's position within its sequence, `[tokens]`.
    pub fn positions(&self) -> Vec<usize> {
        self.ranges().flat_map(|r| 0..r.len()).collect()
    }

    /// The longest sequence.
    pub fn max_len(&self) -> usize {
        self.ranges().map(|r| r.len()).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_and_packed_agree_on_equal_lengths() {
        let a = SeqLayout::uniform(3, 4);
        let b = SeqLayout::packed(&[4, 4, 4]);
        assert_eq!(a, b);
        assert_eq!(a.uniform_len(), Some(4));
        assert_eq!(a.tokens(), 12);
        assert_eq!(a.range(1), 4..8);
    }

    #[test]
    fn positions_restart_per_sequence() {
        let l = SeqLayout::packed(&[2, 0, 3]);
        assert_eq!(l.positions(), vec![0, 1, 0, 1, 2]);
        assert_eq!(l.sequences(), 3);
        assert_eq!(l.uniform_len(), None);
        assert_eq!(l.max_len(), 3);
    }
}
