//! `merge_checkpoint`: the merged Hugging Face checkpoint computes what the adapted model computes.

mod common;

use burn::backend::NdArray;
use common::*;
use prefer::{
    llama::{Checkpoint, LlamaModel, load_dense},
    lora::{LoraConfig, LoraFactory, MergeDtype, load_peft, merge_checkpoint},
    quant::Nf4Factory,
};

type B = NdArray;

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("prefer-merge-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn rows() -> Vec<Vec<u32>> {
    json("lora/peft_r4/expected.json")["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect()
}

#[test]
fn merged_dense_checkpoint_matches_peft() {
    let out = tmp("dense");
    merge_checkpoint(
        &fixture("llama/gqa_f32"),
        &fixture("lora/peft_r4"),
        &out,
        MergeDtype::F32,
    )
    .unwrap();
    let device = Default::default();
    let (model, tok) = load_dense::<B>(&out, &device).unwrap();
    assert!(tok.is_some(), "tokenizer files are copied");
    let expected = json("lora/peft_r4/expected.json");
    for (i, row) in rows().iter().enumerate() {
        let got = token_logprobs(&model, std::slice::from_ref(row), false, &device).remove(0);
        assert_close(
            &format!("merged seq {i}"),
            &got,
            &floats(&expected["logprobs"][i]),
            1e-5,
            1e-6,
        );
    }
    // bf16 output loads and stays close.
    let out16 = tmp("bf16");
    merge_checkpoint(
        &fixture("llama/gqa_f32"),
        &fixture("lora/peft_r4"),
        &out16,
        MergeDtype::Bf16,
    )
    .unwrap();
    let (m16, _) = load_dense::<B>(&out16, &device).unwrap();
    let got = token_logprobs(&m16, &rows()[..1], false, &device).remove(0);
    assert_close(
        "bf16 merge",
        &got,
        &floats(&expected["logprobs"][0]),
        2e-2,
        2e-2,
    );
    let _ = (
        std::fs::remove_dir_all(&out),
        std::fs::remove_dir_all(&out16),
    );
}

/// DoRA: each adapted row is rescaled to its magnitude, as PEFT's forward and merge do.
#[test]
fn merged_dora_checkpoint_matches_peft() {
    let out = tmp("dora");
    merge_checkpoint(
        &fixture("llama/gqa_f32"),
        &fixture("lora/peft_dora"),
        &out,
        MergeDtype::F32,
    )
    .unwrap();
    let device = Default::default();
    let (model, _) = load_dense::<B>(&out, &device).unwrap();
    let expected = json("lora/peft_dora/expected.json");
    for (i, row) in rows().iter().enumerate() {
        let got = token_logprobs(&model, std::slice::from_ref(row), false, &device).remove(0);
        assert_close(
            &format!("merged DoRA seq {i}"),
            &got,
            &floats(&expected["logprobs"][i]),
            1e-5,
            1e-6,
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn merged_nf4_checkpoint_matches_the_nf4_model_with_the_adapter() {
    let out = tmp("nf4");
    let base = fixture("nf4/gqa_f32_bnb4");
    merge_checkpoint(&base, &fixture("lora/peft_r4"), &out, MergeDtype::F32).unwrap();
    let cfg = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(!cfg.contains("quantization_config"));
    let device = Default::default();
    let (merged, _) = load_dense::<B>(&out, &device).unwrap();

    let factory = LoraFactory {
        inner: Nf4Factory::default(),
        config: LoraConfig {
            target_modules: vec![],
            ..Default::default()
        },
        adapter_name: "x".into(),
    };
    let mut adapted: LlamaModel<B, _> = Checkpoint::open(&base)
        .unwrap()
        .build(&factory, &device)
        .unwrap();
    load_peft(&mut adapted, &fixture("lora/peft_r4"), "default").unwrap();
    let a = token_logprobs(&merged, &rows(), true, &device);
    let b = token_logprobs(&adapted, &rows(), true, &device);
    for (x, y) in a.iter().zip(&b) {
        assert_close("merged nf4 vs NF4 + LoRA", x, y, 1e-5, 1e-5);
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn merge_errors_name_the_problem() {
    let out = tmp("err");
    let e = merge_checkpoint(
        &fixture("llama/gqa_f32"),
        &fixture("llama/gqa_f32"),
        &out,
        MergeDtype::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.ends_with("adapter_config.json: No such file or directory (os error 2)"),
        "{e}"
    );
    // An adapter for a model with another MLP width.
    let e = merge_checkpoint(
        &fixture("llama/qwen2"),
        &fixture("lora/peft_r4"),
        &out,
        MergeDtype::F32,
    );
    assert!(e.is_ok() || e.unwrap_err().to_string().contains("but the model needs"));
}
