//! Bad checkpoints give errors that name the file and what is wrong, never a panic.

mod common;

use std::path::Path;

use prefer::llama::{Checkpoint, DenseFactory, LlamaModel};

type B = burn::backend::NdArray;

fn copy_fixture(name: &str, dst: &Path) {
    for entry in std::fs::read_dir(common::fixture(&format!("llama/{name}"))).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
}

fn load_err(path: &Path) -> String {
    let mut ckpt = match Checkpoint::open(path) {
        Ok(c) => c,
        Err(e) => return e.to_string(),
    };
    let r: Result<LlamaModel<B, _>, _> = ckpt.build::<B, _>(&DenseFactory, &Default::default());
    r.expect_err("loading should fail").to_string()
}

/// A scratch directory, removed when dropped.
struct Scratch(std::path::PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tmp(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("prefer-errors-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

#[test]
fn missing_path_and_missing_files() {
    let e = load_err(Path::new("/nonexistent/model"));
    assert_eq!(e, "/nonexistent/model: no such file or directory");

    let dir = tmp("empty");
    assert_eq!(
        load_err(&dir),
        format!(
            "{}: not a model directory: config.json is missing",
            dir.display()
        )
    );

    copy_fixture("gqa_f32", &dir);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert!(load_err(&dir).ends_with(
        "no weights: neither model.safetensors nor model.safetensors.index.json is present"
    ));
}

#[test]
fn wrong_shape_names_the_tensor_and_both_shapes() {
    let dir = tmp("shape");
    copy_fixture("gqa_f32", &dir);
    let cfg = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"intermediate_size\": 176", "\"intermediate_size\": 128");
    std::fs::write(&cfg, text).unwrap();
    assert_eq!(
        load_err(&dir),
        format!(
            "{}: tensor `model.layers.0.mlp.gate_proj.weight` has shape [176, 64], expected [128, 64]",
            dir.display()
        )
    );
}

#[test]
fn missing_shard_and_truncated_files() {
    let dir = tmp("shard");
    copy_fixture("tied_bf16_sharded", &dir);
    let shard = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("-of-00003.safetensors"))
        .unwrap();
    std::fs::remove_file(&shard).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("model.safetensors.index.json: shard") && e.ends_with("is missing"),
        "{e}"
    );

    let dir = tmp("truncated");
    copy_fixture("gqa_f32", &dir);
    std::fs::write(
        dir.join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":",
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(
        e.starts_with(&format!(
            "{}: not a valid safetensors file",
            dir.join("model.safetensors").display()
        )),
        "{e}"
    );

    let gguf = dir.join("bad.gguf");
    let bytes = std::fs::read(common::fixture("llama/gguf/tiny-f32.gguf")).unwrap();
    std::fs::write(&gguf, &bytes[..1000]).unwrap();
    let e = load_err(&gguf);
    assert!(
        e.starts_with(&format!("{}: truncated GGUF header", gguf.display())),
        "{e}"
    );
    std::fs::write(&gguf, b"GGML\x03\x00\x00\x00").unwrap();
    assert_eq!(
        load_err(&gguf),
        format!("{}: not a GGUF file (bad magic)", gguf.display())
    );
}

#[test]
fn unsupported_gguf_tensor_type_is_named() {
    // Rewrite one tensor's ggml type id in the header to Q6_K (14).
    let bytes = std::fs::read(common::fixture("llama/gguf/tiny-f32.gguf")).unwrap();
    let name = b"blk.0.ffn_up.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let type_at = at + 4 + 8 * n_dims;
    let mut bad = bytes.clone();
    bad[type_at..type_at + 4].copy_from_slice(&14u32.to_le_bytes());
    let dir = tmp("q6k");
    let path = dir.join("q6k.gguf");
    std::fs::write(&path, bad).unwrap();
    assert_eq!(
        load_err(&path),
        format!(
            "{}: tensor `blk.0.ffn_up.weight` has unsupported type Q6_K (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1; rows must be whole blocks of 32)",
            path.display()
        )
    );
}
