//! Interoperability with the Python stack: bitsandbytes 4-bit checkpoints as transformers writes
//! them (read, and written bit for bit by `quantize_checkpoint`), and PEFT adapters loaded onto the
//! model with the log-probs PEFT computes. Fixtures from `tools/make_nf4_fixtures.py` and
//! `tools/make_lora_fixtures.py`.

mod common;

use burn::backend::NdArray;
use common::*;
use prefer::{
    llama::{Checkpoint, DenseFactory},
    lora::{LoraConfig, LoraFactory, LoraModel, load_peft},
    quant::{Nf4Factory, Nf4Linear, bnb::quantize_checkpoint},
};
use safetensors::SafeTensors;

struct ReadBnb;

impl Checker for ReadBnb {
    fn run<B: prefer::kernels::PreferBackend>(&self, device: &B::Device) {
        let dir = fixture("nf4/gqa_f32_bnb4");
        let mut ckpt = Checkpoint::open(&dir).unwrap();
        assert!(ckpt.is_bnb_4bit());
        let model: prefer::llama::LlamaModel<B, Nf4Linear<B>> =
            ckpt.build(&Nf4Factory::default(), device).unwrap();
        let expected = json("nf4/gqa_f32_bnb4/expected.json");
        let rows: Vec<Vec<u32>> = expected["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        for (i, row) in rows.iter().enumerate() {
            let got = token_logprobs(&model, std::slice::from_ref(row), false, device).remove(0);
            assert_close(
                &format!("bnb4 seq {i}"),
                &got,
                &floats(&expected["logprobs"][i]),
                1e-5,
                1e-6,
            );
        }
    }
}

#[test]
fn reads_a_bitsandbytes_checkpoint_written_by_transformers() {
    on_each_backend("bnb4", ReadBnb);
}

#[test]
fn writes_the_checkpoint_transformers_writes() {
    let out = std::env::temp_dir().join(format!("prefer-quantize-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let report = quantize_checkpoint(&fixture("llama/gqa_f32"), &out, 64, true).unwrap();
    assert_eq!(report.quantized_tensors, 14);
    let ours = std::fs::read(out.join("model.safetensors")).unwrap();
    let theirs = std::fs::read(fixture("nf4/gqa_f32_bnb4/model.safetensors")).unwrap();
    let (ours, theirs) = (
        SafeTensors::deserialize(&ours).unwrap(),
        SafeTensors::deserialize(&theirs).unwrap(),
    );
    let mut names: Vec<String> = theirs.names().into_iter().map(str::to_owned).collect();
    names.sort();
    let mut our_names: Vec<String> = ours.names().into_iter().map(str::to_owned).collect();
    our_names.sort();
    assert_eq!(our_names, names);
    for name in &names {
        let (a, b) = (ours.tensor(name).unwrap(), theirs.tensor(name).unwrap());
        assert_eq!((a.dtype(), a.shape()), (b.dtype(), b.shape()), "{name}");
        assert!(
            a.data() == b.data(),
            "{name}: bytes differ from transformers + bitsandbytes"
        );
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg["quantization_config"],
        json("nf4/gqa_f32_bnb4/config.json")["quantization_config"]
    );
    let _ = std::fs::remove_dir_all(&out);
}

fn bare_lora<B: prefer::kernels::PreferBackend>(
    dir: &std::path::Path,
    device: &B::Device,
) -> LoraModel<B, prefer::llama::DenseLinear<B>> {
    let factory = LoraFactory {
        inner: DenseFactory,
        config: LoraConfig {
            target_modules: vec![],
            ..Default::default()
        },
        adapter_name: "unused".into(),
    };
    Checkpoint::open(dir)
        .unwrap()
        .build(&factory, device)
        .unwrap()
}

struct PeftParity(&'static str);

impl Checker for PeftParity {
    fn run<B: prefer::kernels::PreferBackend>(&self, device: &B::Device) {
        let name = self.0;
        let mut model = bare_lora::<B>(&fixture("llama/gqa_f32"), device);
        load_peft(&mut model, &fixture(&format!("lora/{name}")), "default").unwrap();
        let expected = json(&format!("lora/{name}/expected.json"));
        let rows: Vec<Vec<u32>> = expected["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        for (i, row) in rows.iter().enumerate() {
            let got = token_logprobs(&model, std::slice::from_ref(row), false, device).remove(0);
            assert_close(
                &format!("{name} seq {i}"),
                &got,
                &floats(&expected["logprobs"][i]),
                1e-5,
                1e-6,
            );
        }
        prefer::lora::set_active_adapter(&mut model, None);
        let got = token_logprobs(&model, std::slice::from_ref(&rows[0]), false, device).remove(0);
        assert_close(
            &format!("{name} base"),
            &got,
            &floats(&expected["base_logprobs"][0]),
            1e-5,
            1e-6,
        );
    }
}

#[test]
fn peft_adapters_give_peft_log_probs() {
    for name in ["peft_r4", "peft_rslora_qv", "peft_dora"] {
        on_each_backend(name, PeftParity(name));
    }
}

#[test]
fn dense_loading_of_a_4bit_checkpoint_says_what_it_is() {
    let err =
        prefer::llama::load_dense::<NdArray>(&fixture("nf4/gqa_f32_bnb4"), &Default::default())
            .unwrap_err()
            .to_string();
    assert!(
        err.contains(
            "has unsupported type U8 (a bitsandbytes 4-bit weight: load this model in 4-bit)"
        ),
        "{err}"
    );
}
