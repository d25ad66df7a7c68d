//! 4-bit NormalFloat (NF4) blockwise quantisation, bit for bit as bitsandbytes does it.
//!
//! A weight is flattened row-major and cut into blocks of `blocksize` values (the last may be
//! shorter). Each block is scaled by its absolute maximum and every value is replaced by the index
//! of the nearest of the 16 NF4 levels; two indices share a byte, the even element in the high nibble.

/// The 16 NF4 levels: quantiles of a standard normal, normalised to [-1, 1], with an exact zero.
/// The values of bitsandbytes' `nf4` lookup table, as f32.
/// The literals are bitsandbytes' own (f64 in its source); they round to the f32 table it uses.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// Block sizes bitsandbytes accepts for 4-bit quantisation.
pub const BLOCK_SIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Decision boundaries between consecutive levels, `(c[i] + c[i+1]) / 2` in f32.
fn bounds() -> [f32; 15] {
    std::array::from_fn(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0)
}

/// The code of a value in [-1, 1]: the number of boundaries strictly below it, as
/// `torch.bucketize(right=False)` (a value exactly on a boundary takes the lower code).
pub fn nf4_code(x: f32, bounds: &[f32; 15]) -> u8 {
    bounds.iter().filter(|b| **b < x).count() as u8
}

/// Quantises `values` blockwise as bitsandbytes 0.50 does on the CPU (`backends/default/ops.py`):
/// full blocks scale by the reciprocal of their absmax (`x · (1/max(m, 1e-38))`); a shorter last
/// block divides by `max(m, 1e-38)` and stores that clamped value. Returns the packed codes
/// (`ceil(n/2)` bytes, an odd tail padded with the zero level) and one absmax per block.
pub fn quantize_nf4(values: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let bounds = bounds();
    let mut absmax = Vec::with_capacity(values.len().div_ceil(blocksize));
    let mut codes = Vec::with_capacity(values.len() + 1);
    for block in values.chunks(blocksize) {
        let m = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        if block.len() == blocksize {
            absmax.push(m);
            let inv = 1.0 / m.max(1e-38);
            codes.extend(
                block
                    .iter()
                    .map(|v| nf4_code((v * inv).clamp(-1.0, 1.0), &bounds)),
            );
        } else {
            let m = m.max(1e-38);
            absmax.push(m);
            codes.extend(
                block
                    .iter()
                    .map(|v| nf4_code((v / m).clamp(-1.0, 1.0), &bounds)),
            );
        }
    }
    (pack_nibbles(&codes), absmax)
}

/// Two 4-bit codes per byte, the even index in the high nibble; an odd count is padded with code 7
/// (the zero level), as bitsandbytes pads with 0.0.
pub fn pack_nibbles(codes: &[u8]) -> Vec<u8> {
    codes
        .chunks(2)
        .map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(7))
        .collect()
}

/// The code of element `i` in packed bytes.
#[inline]
pub fn nibble(packed: &[u8], i: usize) -> u8 {
    let b = packed[i / 2];
    if i.is_multiple_of(2) {
        b >> 4
    } else {
        b & 0x0f
    }
}

/// Dequantises `n` values: `NF4_CODE[code] · absmax[block]`.
pub fn dequantize_nf4(packed: &[u8], absmax: &[f32], blocksize: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| NF4_CODE[nibble(packed, i) as usize] * absmax[i / blocksize])
        .collect()
}
