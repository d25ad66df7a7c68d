//! NF4 on every backend: the device dequantisation of `Nf4Linear` equals the host reference
//! bit for bit, and a model loaded with `load_in_4bit` computes what the dequantised dense model does.

mod common;

use common::*;
use prefer::{
    llama::{Checkpoint, DenseFactory, HostTensor, LinearLayer, LlamaModel, MemoryWeights},
    quant::{Nf4Factory, Nf4Linear, Nf4Weight},
};

/// Deterministic pseudo-random normal-ish values (no zeros), scaled like real weights.
fn weights(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            let mut acc = 0.0f32;
            for _ in 0..4 {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                acc += ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
            }
            acc * 0.05 + 1e-4
        })
        .collect()
}

struct DeviceDequant;

impl Checker for DeviceDequant {
    fn run<B: prefer::kernels::PreferBackend>(&self, device: &B::Device) {
        for (shape, blocksize, double) in [
            ([32, 64], 64, true),
            ([64, 176], 64, true),
            ([7, 9], 64, true),
            ([300, 257], 64, true),
            ([64, 176], 32, false),
            ([64, 176], 4096, true),
        ] {
            let v = weights(shape[0] * shape[1], 11);
            let w = Nf4Weight::quantize(&v, shape, blocksize, double).unwrap();
            let layer = Nf4Linear::<B>::from_weight(&w, None, device);
            let got: Vec<f32> = layer
                .dequantize()
                .into_data()
                .convert::<f32>()
                .to_vec()
                .unwrap();
            assert!(
                got == w.dequantize(),
                "{shape:?} block {blocksize}: device dequantisation differs from the host"
            );
            assert_eq!(
                layer.to_weight().unwrap(),
                w,
                "{shape:?}: codes and scales round-trip through the device"
            );
        }
    }
}

#[test]
fn nf4_linear_dequantises_on_device_as_on_host() {
    on_each_backend("nf4 dequant", DeviceDequant);
}

struct Nf4Model;

impl Checker for Nf4Model {
    fn run<B: prefer::kernels::PreferBackend>(&self, device: &B::Device) {
        let dir = fixture("llama/gqa_f32");
        let mut ckpt = Checkpoint::open(&dir).unwrap();
        let model: LlamaModel<B, Nf4Linear<B>> =
            ckpt.build(&Nf4Factory::default(), device).unwrap();
        // The same model with the NF4 weights dequantised on the host and loaded dense.
        let mut mem = MemoryWeights::new("dequantised");
        let mut src = Checkpoint::open(&dir).unwrap();
        let c = src.config.clone();
        for name in [
            "model.embed_tokens.weight".to_string(),
            "model.norm.weight".into(),
            "lm_head.weight".into(),
        ]
        .into_iter()
        .chain((0..c.num_hidden_layers).flat_map(|i| {
            ["input_layernorm", "post_attention_layernorm"]
                .map(|n| format!("model.layers.{i}.{n}.weight"))
        })) {
            mem.insert(name.clone(), src.weights.take(&name).unwrap().unwrap());
        }
        for (site, layer) in model.projections() {
            let w = layer.to_weight().unwrap();
            mem.insert(
                format!("{}.weight", site.hf_path()),
                HostTensor::new(w.shape.to_vec(), w.dequantize()),
            );
        }
        let dense = LlamaModel::<B, _>::from_weights(&c, &mut mem, &DenseFactory, device).unwrap();
        let rows: Vec<Vec<u32>> = json("llama/gqa_f32/expected.json")["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        let a = token_logprobs(&model, &rows, true, device);
        let b = token_logprobs(&dense, &rows, true, device);
        for (x, y) in a.iter().zip(&b) {
            assert_close("nf4 vs dequantised dense", x, y, 1e-5, 1e-6);
        }
        // And NF4 is a real approximation: close to, but not equal to, full precision.
        let (full, _) = prefer::llama::load_dense::<B>(&dir, device).unwrap();
        let f = token_logprobs(&full, &rows, true, device);
        assert_ne!(a, f);
        let _ = model.projections()[0].1.dims();
    }
}

#[test]
fn load_in_4bit_matches_the_dequantised_dense_model() {
    on_each_backend("nf4 model", Nf4Model);
}
