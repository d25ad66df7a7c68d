//! Dequantisation of the ggml tensor types prefer reads: F32, F16, BF16, Q8_0, Q4_0 and Q4_1.
//! The quantised types are blocks of 32 values with an f16 scale (and minimum for Q4_1).

use half::{bf16, f16};

/// ggml type ids (`enum ggml_type`).
pub mod ggml_type {
    /// 32-bit float.
    pub const F32: u32 = 0;
    /// 16-bit float.
    pub const F16: u32 = 1;
    /// 4-bit, scale only.
    pub const Q4_0: u32 = 2;
    /// 4-bit, scale and minimum.
    pub const Q4_1: u32 = 3;
    /// 8-bit, scale only.
    pub const Q8_0: u32 = 8;
    /// bfloat16.
    pub const BF16: u32 = 30;
}

/// Name of a ggml type id, for messages.
pub fn type_name(t: u32) -> String {
    let names = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
        "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL",
        "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
    ];
    names
        .get(t as usize)
        .map_or_else(|| format!("type {t}"), |n| (*n).to_string())
}

/// Bytes needed for `n` values of type `t`, or `None` if the type is unsupported or `n` does not
/// fill whole blocks.
pub fn byte_size(t: u32, n: usize) -> Option<usize> {
    match t {
        ggml_type::F32 => Some(4 * n),
        ggml_type::F16 | ggml_type::BF16 => Some(2 * n),
        ggml_type::Q8_0 => n.is_multiple_of(32).then_some(n / 32 * 34),
        ggml_type::Q4_0 => n.is_multiple_of(32).then_some(n / 32 * 18),
        ggml_type::Q4_1 => n.is_multiple_of(32).then_some(n / 32 * 20),
        _ => None,
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantises `bytes` of type `t` to f32 (`bytes.len()` must equal [`byte_size`]).
pub fn dequantize(t: u32, bytes: &[u8]) -> Vec<f32> {
    match t {
        ggml_type::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        ggml_type::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        ggml_type::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        ggml_type::Q8_0 => bytes
            .chunks_exact(34)
            .flat_map(|blk| {
                let d = f16_at(blk, 0);
                blk[2..].iter().map(move |&q| q as i8 as f32 * d)
            })
            .collect(),
        ggml_type::Q4_0 => bytes
            .chunks_exact(18)
            .flat_map(|blk| {
                let d = f16_at(blk, 0);
                nibbles(&blk[2..]).map(move |q| (q as f32 - 8.0) * d)
            })
            .collect(),
        ggml_type::Q4_1 => bytes
            .chunks_exact(20)
            .flat_map(|blk| {
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                nibbles(&blk[4..]).map(move |q| q as f32 * d + m)
            })
            .collect(),
        other => unreachable!("byte_size rejects ggml type {other}"),
    }
}

/// The 32 4-bit values of a block: low nibbles are elements 0..16, high nibbles 16..32.
fn nibbles(qs: &[u8]) -> impl Iterator<Item = u8> + '_ {
    qs.iter().map(|b| b & 0x0f).chain(qs.iter().map(|b| b >> 4))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_0_layout_low_nibbles_first() {
        let mut blk = f16::from_f32(0.5).to_le_bytes().to_vec();
        blk.extend((0..16u8).map(|i| (15 - i) << 4 | i));
        let v = dequantize(ggml_type::Q4_0, &blk);
        assert_eq!(v[0], (0.0 - 8.0) * 0.5);
        assert_eq!(v[15], (15.0 - 8.0) * 0.5);
        assert_eq!(v[16], (15.0 - 8.0) * 0.5);
        assert_eq!(v[31], (0.0 - 8.0) * 0.5);
    }

    #[test]
    fn q4_1_and_q8_0() {
        let mut blk = f16::from_f32(0.25).to_le_bytes().to_vec();
        blk.extend(f16::from_f32(-1.0).to_le_bytes());
        blk.extend([0x21u8; 16]);
        let v = dequantize(ggml_type::Q4_1, &blk);
        assert_eq!((v[0], v[16]), (1.0 * 0.25 - 1.0, 2.0 * 0.25 - 1.0));

        let mut blk = f16::from_f32(2.0).to_le_bytes().to_vec();
        blk.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let v = dequantize(ggml_type::Q8_0, &blk);
        assert_eq!((v[0], v[31]), (-32.0, 30.0));
        assert_eq!(byte_size(ggml_type::Q8_0, 33), None);
    }
}
