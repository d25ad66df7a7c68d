//! Shared pieces of the CPU (burn-flex) fast paths: typed views of a tensor's storage, building a
//! tensor from a vector, and row-parallel loops on rayon's pool (the one burn-flex's matmuls use).

use std::borrow::Cow;

use burn::tensor::{DType, Shape, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// Whether every tensor holds a type the fast paths take: f32, or f16/bf16, which they widen to f32
/// on the way in and round back on the way out (f64 takes the tensor-op path).
pub(crate) fn is_f32(tensors: &[&FlexTensor]) -> bool {
    tensors
        .iter()
        .all(|t| matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16))
}

/// The tensor's elements in row-major order as f32: borrowed when it is a contiguous f32 tensor,
/// copied (and widened from f16/bf16) otherwise.
pub(crate) fn f32_slice(t: &FlexTensor) -> Cow<'_, [f32]> {
    if t.dtype() == DType::F32
        && let Some(s) = t.as_slice::<f32>()
    {
        return Cow::Borrowed(s);
    }
    let data = t.to_contiguous().into_data().convert::<f32>();
    Cow::Owned(data.into_vec::<f32>().unwrap_or_default())
}

/// Whether `t` is an f32 tensor of exactly `len` elements in row-major order from the start of a
/// buffer that no other tensor shares, so that it may be updated in place.
pub(crate) fn is_unique_f32(t: &FlexTensor, len: usize) -> bool {
    t.dtype() == DType::F32
        && t.is_unique()
        && t.is_contiguous()
        && t.layout().start_offset() == 0
        && t.storage::<f32>().len() == len
}

/// A contiguous tensor of `shape` and `dtype` from f32 `values` (no copy for f32; rounded for
/// f16/bf16).
pub(crate) fn store(values: Vec<f32>, shape: Shape, dtype: DType) -> FlexTensor {
    let data = TensorData::new(values, shape);
    FlexTensor::from_data(if dtype == DType::F32 {
        data
    } else {
        data.convert_dtype(dtype)
    })
}

/// Rounds an f32 to `dtype` and back (the identity for f32).
pub(crate) fn rounding(dtype: DType) -> fn(f32) -> f32 {
    use burn::tensor::{bf16, f16};
    match dtype {
        DType::F16 => |v| f16::from_f32(v).to_f32(),
        DType::BF16 => |v| bf16::from_f32(v).to_f32(),
        _ => |v| v,
    }
}

/// A contiguous f32 tensor of `shape` from `values` (no copy).
pub(crate) fn f32_tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// Runs `f(row, out_row, per_row_value)` over the rows of `out` (`width` elements each) in
/// parallel; `per_row` holds one value per row.
pub(crate) fn par_rows<F>(out: &mut [f32], width: usize, per_row: &mut [f32], f: F)
where
    F: Fn(usize, &mut [f32], &mut f32) + Sync + Send,
{
    let width = width.max(1);
    // Rows in chunks of at least ~16k elements, so small tensors do not pay for scheduling.
    let min_rows = (16_384 / width).max(1);
    out.par_chunks_mut(width)
        .zip(per_row.par_iter_mut())
        .enumerate()
        .with_min_len(min_rows)
        .for_each(|(i, (row, value))| f(i, row, value));
}

/// Runs `f(index, chunk)` over consecutive chunks of `out` of `chunk` elements in parallel.
pub(crate) fn par_chunks<F>(out: &mut [f32], chunk: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    let chunk = chunk.max(1);
    out.par_chunks_mut(chunk)
        .enumerate()
        .with_min_len((16_384 / chunk).max(1))
        .for_each(|(i, c)| f(i, c));
}

/// An output buffer that parallel tasks write at disjoint positions.
pub(crate) struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: tasks only write through `SharedOut` at positions no other task touches (each caller
// states why), and the buffer outlives the parallel loop that borrows it.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub(crate) fn new(buf: &mut [f32]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }

    /// # Safety
    /// No other task may access element `i` during the loop.
    pub(crate) unsafe fn write(&self, i: usize, value: f32) {
        assert!(i < self.len, "SharedOut::write: {i} out of {}", self.len);
        // SAFETY: in bounds (checked), and exclusive by the caller's contract.
        unsafe { *self.ptr.add(i) = value };
    }

    /// # Safety
    /// No other task may access `start .. start + values.len()` during the loop.
    pub(crate) unsafe fn write_slice(&self, start: usize, values: &[f32]) {
        assert!(
            start + values.len() <= self.len,
            "SharedOut::write_slice out of bounds"
        );
        // SAFETY: in bounds (checked), and exclusive by the caller's contract.
        unsafe {
            std::ptr::copy_nonoverlapping(values.as_ptr(), self.ptr.add(start), values.len())
        };
    }

    /// The destination of a strided write starting at `start`: its pointer and the elements
    /// available from there.
    pub(crate) fn at(&self, start: usize) -> Dst {
        assert!(start <= self.len, "SharedOut::at out of bounds");
        Dst {
            // SAFETY: `start ≤ len`, so the pointer stays within (or one past) the buffer.
            ptr: unsafe { self.ptr.add(start) },
            len: self.len - start,
        }
    }
}

/// Where a [`matmul`] writes: a pointer and how many elements may be written from it.
pub(crate) struct Dst {
    ptr: *mut f32,
    len: usize,
}

impl From<&mut [f32]> for Dst {
    fn from(buf: &mut [f32]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }
}

/// The largest offset a `rows × cols` matrix with strides (`rs`, `cs`) touches, plus one.
pub(crate) fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// `dst[m×n] = (dst if acc) + beta · lhs[m×k] · rhs[k×n]` on one thread (the callers are already
/// parallel), every operand strided by (row stride, column stride), `dst` row-major. Bounds are
/// checked up front.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: impl Into<Dst>,
    dst_rs: usize,
    acc: bool,
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
    beta: f32,
) {
    strided_matmul(
        m,
        n,
        k,
        dst.into(),
        (dst_rs, 1),
        acc,
        (lhs, lhs_rs, lhs_cs),
        (rhs, rhs_rs, rhs_cs),
        beta,
    );
}

/// [`matmul`] into a column-major `dst` (element `(i, j)` at `j · m + i`). gemm's kernels write
/// column panels: with few rows and a wide right-hand side, a column-major destination spares it
/// repacking the wide operand on every call (the fused LM head's case).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_to_columns(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    acc: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
    beta: f32,
) {
    strided_matmul(m, n, k, dst.into(), (1, m), acc, lhs, rhs, beta);
}

/// A strided operand: (elements, row stride, column stride).
type Operand<'a> = (&'a [f32], usize, usize);

#[allow(clippy::too_many_arguments)]
fn strided_matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: Dst,
    (dst_rs, dst_cs): (usize, usize),
    acc: bool,
    (lhs, lhs_rs, lhs_cs): Operand<'_>,
    (rhs, rhs_rs, rhs_cs): Operand<'_>,
    beta: f32,
) {
    assert!(
        extent(m, n, dst_rs, dst_cs) <= dst.len,
        "matmul: destination too small"
    );
    assert!(
        extent(m, k, lhs_rs, lhs_cs) <= lhs.len(),
        "matmul: lhs too small"
    );
    assert!(
        extent(k, n, rhs_rs, rhs_cs) <= rhs.len(),
        "matmul: rhs too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: every index the product touches lies within the operands (checked above).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            dst_cs as isize,
            dst_rs as isize,
            acc,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}
