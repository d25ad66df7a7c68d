//! bitsandbytes' 8-bit blockwise quantisation with its signed "dynamic" map, used for double
//! quantisation: the per-block absmax of NF4 is itself stored as 8-bit codes around its mean.

/// Block size bitsandbytes uses for the nested (second-level) quantisation.
pub const NESTED_BLOCKSIZE: usize = 256;

/// bitsandbytes' signed dynamic map (`create_dynamic_map(signed=True)`), as f32 bit patterns.
pub static DYNAMIC_MAP_BITS: [u32; 256] = include!("dynamic_map_bits.in");

/// The dynamic map as floats, ascending.
pub fn dynamic_map() -> [f32; 256] {
    DYNAMIC_MAP_BITS.map(f32::from_bits)
}

/// bitsandbytes' CPU quantiser does not search for the nearest code: it maps a value in [-1, 1]
/// to one of 65 536 bins and reads the code from a table (`csrc/cpu_ops.cpp`). Bin `i` holds the
/// number of map midpoints strictly below `-1 + 2i/65535`.
fn bin_table() -> &'static [u8] {
    static TABLE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let map = dynamic_map();
        let mids: Vec<f32> = map.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        (0..65536u32)
            .map(|i| {
                let val = -1.0f32 + (2.0f32 * i as f32) / 65535.0;
                mids.iter().filter(|m| **m < val).count().min(255) as u8
            })
            .collect()
    })
}

/// The bin of a scaled value: `trunc(fma((clamp(v) + 1) · 0.5, 65535, 0.5))`.
fn bin(v: f32) -> usize {
    let t = (v.clamp(-1.0, 1.0) + 1.0) * 0.5;
    t.mul_add(65535.0, 0.5) as usize
}

/// 8-bit blockwise quantisation with the dynamic map, as bitsandbytes' CPU `quantize_blockwise`:
/// one code per value and one absmax per block; an all-zero block gets codes 0.
pub fn quantize_blockwise(values: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let table = bin_table();
    let mut absmax = Vec::with_capacity(values.len().div_ceil(blocksize));
    let mut codes = Vec::with_capacity(values.len());
    for block in values.chunks(blocksize) {
        let m = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        absmax.push(m);
        if m == 0.0 {
            codes.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let inv = 1.0 / m;
        codes.extend(block.iter().map(|v| table[bin(v * inv)]));
    }
    (codes, absmax)
}

/// `map[code] · absmax[block]` in f32.
pub fn dequantize_blockwise(codes: &[u8], absmax: &[f32], blocksize: usize) -> Vec<f32> {
    let map = dynamic_map();
    codes
        .iter()
        .enumerate()
        .map(|(i, &c)| map[c as usize] * absmax[i / blocksize])
        .collect()
}
