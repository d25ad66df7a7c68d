//! NF4 against bitsandbytes 0.50.2 itself: packed codes, absmax codes, nested statistics, offset and
//! dequantised values identical to the bit, on seeded random matrices of many shapes and block sizes
//! (fixtures from `tools/make_nf4_fixtures.py`).

use std::path::PathBuf;

use prefer_quant::{Absmax, Nf4Weight, double_quant::DYNAMIC_MAP_BITS, nf4::NF4_CODE};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/nf4")
}

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join(name)).unwrap()).unwrap()
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("fixture tensor {name}"));
    assert_eq!(t.dtype(), Dtype::F32, "{name}");
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn code_tables_are_bitsandbytes_tables() {
    let t = json("tables.json");
    let nf4: Vec<u32> = t["nf4_bits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(bits(&NF4_CODE), nf4);
    let dynamic: Vec<u32> = t["dynamic_bits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(DYNAMIC_MAP_BITS.to_vec(), dynamic);
}

#[test]
fn quantisation_is_identical_to_bitsandbytes() {
    let cases = json("cases.json");
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 15);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let shape: Vec<usize> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let blocksize = case["blocksize"].as_u64().unwrap() as usize;
        let double = case["compress_statistics"].as_bool().unwrap();
        let bytes = std::fs::read(dir().join(format!("{name}.safetensors"))).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();

        let input = f32s(&st, "input");
        let w = Nf4Weight::quantize(&input, [shape[0], shape[1]], blocksize, double).unwrap();
        assert_eq!(
            w.packed,
            st.tensor("packed").unwrap().data(),
            "{name}: packed codes"
        );
        match &w.absmax {
            Absmax::Plain(a) => {
                assert!(!double);
                assert_eq!(bits(a), bits(&f32s(&st, "absmax")), "{name}: absmax");
            }
            Absmax::Double {
                codes,
                nested_absmax,
                offset,
            } => {
                assert!(double);
                assert_eq!(
                    codes.as_slice(),
                    st.tensor("absmax").unwrap().data(),
                    "{name}: absmax codes"
                );
                assert_eq!(
                    bits(nested_absmax),
                    bits(&f32s(&st, "nested_absmax")),
                    "{name}: nested absmax"
                );
                assert_eq!(
                    offset.to_bits(),
                    f32s(&st, "offset")[0].to_bits(),
                    "{name}: offset"
                );
            }
        }
        assert_eq!(
            bits(&w.absmax.values()),
            bits(&f32s(&st, "absmax_dequantized")),
            "{name}: dequantised absmax"
        );
        assert_eq!(
            bits(&w.dequantize()),
            bits(&f32s(&st, "dequantized")),
            "{name}: dequantised weight"
        );
        let bpp = case["bits_per_param"].as_f64().unwrap();
        assert_eq!(
            Nf4Weight::bits_per_parameter(blocksize, double),
            bpp,
            "{name}: bits per parameter"
        );
    }
}
