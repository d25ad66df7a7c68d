//! A quantised weight on the host in bitsandbytes' layout: packed NF4 codes plus the per-block
//! absmax, itself 8-bit quantised when double quantisation is on.

use crate::{
    double_quant::{NESTED_BLOCKSIZE, dequantize_blockwise, quantize_blockwise},
    nf4::{BLOCK_SIZES, NF4_CODE, dequantize_nf4, quantize_nf4},
};

/// The per-block scales of an NF4 weight.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    Plain(Vec<f32>),
    /// Double quantisation: `absmax = dynamic[codes] · nested_absmax[block / 256] + offset`.
    Double {
        /// One 8-bit code per block.
        codes: Vec<u8>,
        /// One f32 per 256 blocks.
        nested_absmax: Vec<f32>,
        /// Mean of the absmax values, subtracted before the 8-bit quantisation.
        offset: f32,
    },
}

impl Absmax {
    /// The f32 absmax of every block.
    pub fn values(&self) -> Vec<f32> {
        match self {
            Self::Plain(v) => v.clone(),
            Self::Double {
                codes,
                nested_absmax,
                offset,
            } => dequantize_blockwise(codes, nested_absmax, NESTED_BLOCKSIZE)
                .into_iter()
                .map(|v| v + offset)
                .collect(),
        }
    }
}

/// An NF4-quantised 2-D weight `[out, in]`, flattened row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Weight {
    /// `[out, in]`.
    pub shape: [usize; 2],
    /// Values per block.
    pub blocksize: usize,
    /// `ceil(n/2)` bytes, even element in the high nibble.
    pub packed: Vec<u8>,
    /// Per-block scales.
    pub absmax: Absmax,
}

/// A block size bitsandbytes would refuse.
#[derive(Debug, thiserror::Error)]
#[error("block size {0} is not supported (supported: 32, 64, 128, 256, 512, 1024, 2048, 4096)")]
pub struct BlockSizeError(pub usize);

impl Nf4Weight {
    /// Quantises a row-major `[out, in]` weight as `bitsandbytes.functional.quantize_4bit(..., quant_type="nf4",
    /// blocksize, compress_statistics=double_quant)`.
    pub fn quantize(
        values: &[f32],
        shape: [usize; 2],
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Self, BlockSizeError> {
        if !BLOCK_SIZES.contains(&blocksize) {
            return Err(BlockSizeError(blocksize));
        }
        debug_assert_eq!(values.len(), shape[0] * shape[1]);
        let (packed, absmax) = quantize_nf4(values, blocksize);
        let absmax = if double_quant {
            let offset = mean_f32(&absmax);
            let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
            let (codes, nested_absmax) = quantize_blockwise(&centred, NESTED_BLOCKSIZE);
            Absmax::Double {
                codes,
                nested_absmax,
                offset,
            }
        } else {
            Absmax::Plain(absmax)
        };
        Ok(Self {
            shape,
            blocksize,
            packed,
            absmax,
        })
    }

    /// Number of weights.
    pub fn len(&self) -> usize {
        self.shape[0] * self.shape[1]
    }

    /// Whether the weight has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of blocks.
    pub fn n_blocks(&self) -> usize {
        self.len().div_ceil(self.blocksize)
    }

    /// The f32 weight, row-major `[out, in]`.
    pub fn dequantize(&self) -> Vec<f32> {
        dequantize_nf4(
            &self.packed,
            &self.absmax.values(),
            self.blocksize,
            self.len(),
        )
    }

    /// Bytes this weight occupies: codes, scales and (for double quantisation) nested scales and offset.
    pub fn storage_bytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Absmax::Plain(v) => 4 * v.len(),
                Absmax::Double {
                    codes,
                    nested_absmax,
                    ..
                } => codes.len() + 4 * nested_absmax.len() + 4,
            }
    }

    /// Nominal bits per parameter: 4 + 32/blocksize, or 4 + 8/blocksize + 32/(blocksize·256) with
    /// double quantisation (≈ 4.127 at block 64).
    pub fn bits_per_parameter(blocksize: usize, double_quant: bool) -> f64 {
        let b = blocksize as f64;
        if double_quant {
            4.0 + 8.0 / b + 32.0 / (b * NESTED_BLOCKSIZE as f64)
        } else {
            4.0 + 32.0 / b
        }
    }

    /// The NF4 code table, as written into checkpoints (`weight.quant_map`).
    pub fn quant_map() -> [f32; 16] {
        NF4_CODE
    }
}

/// `tensor.mean()` of an f32 CPU tensor as PyTorch computes it (single-threaded): the sum by
/// ATen's cascade kernel — 8-lane vectors, 4-way interleaving, multi-level partial sums — then a
/// division by the count. bitsandbytes' double-quantisation offset is this value, so it must be
/// reproduced to the bit. (PyTorch splits sums over threads above ~32k elements; a model with more
/// than that many blocks per weight can see a last-bit difference in its offset.)
pub fn mean_f32(v: &[f32]) -> f32 {
    torch_sum_f32(v) / v.len() as f32
}

fn ceil_log2(x: usize) -> u32 {
    if x <= 2 {
        1
    } else {
        usize::BITS - (x - 1).leading_zeros()
    }
}

/// `multi_row_sum` of ATen's SumKernel.cpp over `nrows` interleaved rows of `L`-lane values
/// (its index loops kept as written there, to be checkable).
#[allow(clippy::needless_range_loop)]
fn multi_row_sum<const L: usize>(
    load: impl Fn(usize, usize) -> [f32; L],
    nrows: usize,
    size: usize,
) -> Vec<[f32; L]> {
    const LEVELS: usize = 4;
    let level_power = (ceil_log2(size) / LEVELS as u32).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let add = |a: [f32; L], b: [f32; L]| -> [f32; L] { std::array::from_fn(|l| a[l] + b[l]) };
    let mut acc = vec![vec![[0.0f32; L]; nrows]; LEVELS];
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            for k in 0..nrows {
                acc[0][k] = add(acc[0][k], load(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..nrows {
                acc[j][k] = add(acc[j][k], acc[j - 1][k]);
                acc[j - 1][k] = [0.0; L];
            }
            if i & (level_mask << (j as u32 * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for k in 0..nrows {
            acc[0][k] = add(acc[0][k], load(i, k));
        }
        i += 1;
    }
    for j in 1..LEVELS {
        for k in 0..nrows {
            acc[0][k] = add(acc[0][k], acc[j][k]);
        }
    }
    acc.swap_remove(0)
}

/// `row_sum`: four interleaved rows, the tail into the first, then the rows added.
fn row_sum<const L: usize>(load: impl Fn(usize) -> [f32; L], size: usize) -> [f32; L] {
    let size_ilp = size / 4;
    let mut ps = multi_row_sum(|i, k| load(i * 4 + k), 4, size_ilp);
    for i in size_ilp * 4..size {
        ps[0] = std::array::from_fn(|l| ps[0][l] + load(i)[l]);
    }
    for k in 1..4 {
        ps[0] = std::array::from_fn(|l| ps[0][l] + ps[k][l]);
    }
    ps[0]
}

/// `torch.sum` of a contiguous f32 CPU tensor with fewer than 32 768 elements.
pub fn torch_sum_f32(x: &[f32]) -> f32 {
    const LANES: usize = 8;
    let n = x.len();
    if n < LANES {
        return row_sum::<1>(|i| [x[i]], n)[0];
    }
    let nv = n / LANES;
    let vacc = row_sum::<LANES>(|i| std::array::from_fn(|l| x[i * LANES + l]), nv);
    let mut fin = 0.0f32;
    for v in &x[nv * LANES..] {
        fin += v;
    }
    for v in vacc {
        fin += v;
    }
    fin
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_per_parameter_at_block_64() {
        let b = Nf4Weight::bits_per_parameter(64, true);
        assert!((b - 4.127).abs() < 1e-3, "{b}");
        assert_eq!(Nf4Weight::bits_per_parameter(64, false), 4.5);
    }

    #[test]
    fn odd_sizes_and_bad_block_size() {
        let v: Vec<f32> = (0..63)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let w = Nf4Weight::quantize(&v, [7, 9], 64, true).unwrap();
        assert_eq!(w.packed.len(), 32);
        assert_eq!(w.n_blocks(), 1);
        let d = w.dequantize();
        assert_eq!(d.len(), 63);
        assert!(Nf4Weight::quantize(&v, [7, 9], 48, true).is_err());
    }
}
