//! `prefer train` from the command line: the built-in job, config files and flags, errors, and a
//! process killed while it writes checkpoints.

use std::{
    path::{Path, PathBuf},
    process::{Command as Process, Output, Stdio},
    time::Duration,
};

use assert_cmd::Command;

fn prefer() -> Command {
    Command::cargo_bin("prefer").expect("binary built")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("prefer-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn rows(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn the_builtin_job_learns_and_writes_every_output() {
    let out = scratch("builtin");
    let run = prefer()
        .args(["train", "--output"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("eval (before)") && stdout.contains("rewards/accuracies"),
        "{stdout}"
    );
    let evals: Vec<_> = rows(&out)
        .into_iter()
        .filter(|r| r.get("eval_loss").is_some())
        .collect();
    let (first, last) = (&evals[0], evals.last().unwrap());
    assert_eq!(first["step"], 0);
    assert!((first["eval_loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-4);
    let acc = last["eval_rewards/accuracies"].as_f64().unwrap();
    assert!(acc >= 0.9, "held-out accuracy after training: {acc}");
    assert!(last["eval_loss"].as_f64().unwrap() < std::f64::consts::LN_2);
    for f in [
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "metrics.csv",
        "training_curves.svg",
        "summary.md",
        "config.toml",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(out.join("checkpoint-48/optimizer.bin").is_file());
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn flags_override_the_file_and_print_config_shows_the_result() {
    let dir = scratch("print");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("dpo.toml");
    std::fs::write(&file, "beta = 0.5\nlearning_rate = 1e-4\nr = 4\n").unwrap();
    let out = prefer()
        .args(["train", "--config"])
        .arg(&file)
        .args([
            "--print-config",
            "--learning-rate",
            "5e-5",
            "--target-modules",
            "q_proj,v_proj",
            "--precompute-ref-log-probs",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let cfg: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(cfg["beta"].as_float(), Some(0.5));
    assert_eq!(cfg["learning_rate"].as_float(), Some(5e-5));
    assert_eq!(cfg["r"].as_integer(), Some(4));
    assert_eq!(cfg["precompute_ref_log_probs"].as_bool(), Some(true));
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A TRL recipe in YAML runs as it is: its keys under prefer's names, ModelConfig's defaults for
/// what it leaves out, one warning per key that changes nothing here; TRL's names work as flags.
#[test]
fn a_trl_recipe_reads_unchanged_and_its_keys_are_flags() {
    let recipe =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/recipes/dpo_qlora.yaml");
    let out = prefer()
        .args(["train", "--config"])
        .arg(&recipe)
        .args([
            "--print-config",
            "--lora-alpha",
            "64",
            "--use-bnb-nested-quant=false",
            "--bf16",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let cfg: toml::Table = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(cfg["model"].as_str(), Some("runs/smol"));
    assert_eq!(cfg["r"].as_integer(), Some(32));
    assert_eq!(cfg["lora_alpha"].as_float(), Some(64.0));
    assert_eq!(cfg["lora_dropout"].as_float(), Some(0.05));
    assert_eq!(cfg["bnb_4bit_use_double_quant"].as_bool(), Some(false));
    assert_eq!(cfg["eval_strategy"].as_str(), Some("steps"));
    assert_eq!(cfg["bf16"].as_bool(), Some(true));
    assert_eq!(cfg["gradient_checkpointing"].as_bool(), Some(true));
    let err = stderr(&out);
    let warnings: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("warning: `"))
        .collect();
    assert_eq!(warnings.len(), 4, "{err}");
    assert!(
        err.contains("warning: `optim = \"paged_adamw_8bit\"`: AdamW keeps its state in f32"),
        "{err}"
    );
    // A TRL key prefer cannot honour is refused as a flag too, naming it.
    let out = prefer()
        .args(["train", "--config"])
        .arg(&recipe)
        .args(["--print-config", "--push-to-hub"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with("error: command line: `push_to_hub`:") && err.contains("hf upload"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn unknown_keys_suggest_the_nearest() {
    let out = prefer()
        .args(["train", "--lerning-rate", "1e-4"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        "error: unknown option `--lerning-rate`; did you mean `--learning-rate`?\n"
    );
    let dir = scratch("unknown");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("dpo.toml");
    std::fs::write(&file, "beta = 0.1\nper_device_batch_size = 4\n").unwrap();
    let out = prefer()
        .args(["train", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("dpo.toml:2: `per_device_batch_size`: unknown key; did you mean `per_device_eval_batch_size`?")
            || err.contains("dpo.toml:2: `per_device_batch_size`: unknown key; did you mean `per_device_train_batch_size`?"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    std::fs::write(&file, "beta = 0.1\nr = \n").unwrap();
    let out = prefer()
        .args(["train", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(
        err.contains("dpo.toml:2: ") && err.lines().count() == 1,
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_values_and_missing_files_are_one_line_naming_the_option() {
    for (args, needle) in [
        (vec!["--beta", "-1"], "`beta`"),
        (
            vec!["--per-device-train-batch-size", "0"],
            "`per_device_train_batch_size`",
        ),
        (
            vec!["--lr-scheduler-type", "exponential"],
            "lr_scheduler_type",
        ),
        (
            vec!["--model", "/no/such/model", "--data", "/no/such.jsonl"],
            "/no/such",
        ),
        (
            vec!["--bnb-4bit-quant-type", "fp4"],
            "`bnb_4bit_quant_type`",
        ),
    ] {
        let out = prefer().arg("train").args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        assert!(
            err.starts_with("error: ") && err.contains(needle),
            "{args:?}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
}

/// Kills `prefer train` at several moments while it writes a checkpoint every step; each time the
/// newest complete checkpoint must resume.
#[test]
fn a_killed_run_resumes_from_its_last_complete_checkpoint() {
    let out = scratch("killed");
    let bin = assert_cmd::cargo::cargo_bin("prefer");
    let args = |resume: bool| {
        let mut a: Vec<String> = [
            "train",
            "--output",
            out.to_str().unwrap(),
            "--save-steps",
            "1",
            "--eval-steps",
            "0",
            "--num-train-epochs",
            "1",
            "--save-total-limit",
            "3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if resume {
            a.push("--resume".into());
        }
        a
    };
    let newest = |dir: &Path| -> usize {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .strip_prefix("checkpoint-")
                            .and_then(|n| n.parse().ok())
                    })
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    };
    let mut resumed = false;
    // Each run is killed shortly after it writes a new checkpoint (one per step): the kill lands
    // while the following ones are being written.
    for delay_ms in [0u64, 40, 120] {
        let before = newest(&out);
        let mut child = Process::new(&bin)
            .args(args(resumed))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while newest(&out) <= before && started.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        resumed = newest(&out) > 0;
    }
    assert!(resumed, "no checkpoint was written before the kills");
    let run = prefer().args(args(true)).output().unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(String::from_utf8_lossy(&run.stderr).contains("resumed from"));
    assert!(out.join("adapter/adapter_model.safetensors").is_file());
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".checkpoint-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary checkpoint directories left behind"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

/// `ref_model = PATH`: a separate reference, run once before training. With a fresh adapter the
/// policy is the base, so against the same base as reference the first evaluation is exactly ln 2.
#[test]
fn a_separate_reference_model_is_precomputed() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let model = fixtures.join("llama/gqa_f32");
    let out = scratch("refmodel");
    let run = prefer()
        .args(["train", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(fixtures.join("dpo/standard.jsonl"))
        .arg("--eval-data")
        .arg(fixtures.join("dpo/standard.jsonl"))
        .arg("--ref-model")
        .arg(&model)
        .arg("--output")
        .arg(&out)
        .args([
            "--max-steps",
            "2",
            "--eval-on-start",
            "--learning-rate",
            "1e-3",
            "--per-device-train-batch-size",
            "5",
        ])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(
        stderr(&run).contains("computing reference log-probs with"),
        "{}",
        stderr(&run)
    );
    let evals: Vec<_> = rows(&out)
        .into_iter()
        .filter(|r| r.get("eval_loss").is_some())
        .collect();
    let first = evals[0]["eval_loss"].as_f64().unwrap();
    assert!((first - std::f64::consts::LN_2).abs() < 1e-6, "{first}");
    assert!(
        evals.last().unwrap()["eval_rewards/margins"]
            .as_f64()
            .unwrap()
            != 0.0
    );
    std::fs::remove_dir_all(&out).unwrap();
}

/// A Hub dataset id (TRL's `dataset_name`) is read from the local Hugging Face cache, offline: the
/// Parquet shards of its train split are trained on and its test split is held out. A split it does
/// not have is an error listing the ones it has.
#[test]
fn a_hub_dataset_trains_on_its_train_split_and_holds_out_its_test_split() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let cache = scratch("hub-dataset");
    let commit = "fedcba9876543210fedcba9876543210fedcba98";
    let repo = cache.join("datasets--Org--prefs");
    let data = repo.join("snapshots").join(commit).join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for e in std::fs::read_dir(fixtures.join("dpo/parquet/hub/data")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), data.join(e.file_name())).unwrap();
    }
    let train = |extra: &[&str]| {
        prefer()
            .env("HF_HUB_CACHE", &cache)
            .args(["train", "--model"])
            .arg(fixtures.join("llama/gqa_f32"))
            .args(["--dataset-name", "Org/prefs", "--max-steps", "1"])
            .args(["--eval-strategy", "steps", "--eval-steps", "1"])
            .arg("--output")
            .arg(cache.join("out"))
            .args(extra)
            .output()
            .unwrap()
    };
    let run = train(&[]);
    assert!(run.status.success(), "{}", stderr(&run));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("5 training pairs, 2 held out"), "{stdout}");
    assert!(
        rows(&cache.join("out"))
            .iter()
            .any(|r| r.get("eval_loss").is_some())
    );

    let run = train(&["--dataset-train-split", "validation"]);
    assert_eq!(run.status.code(), Some(1));
    let err = stderr(&run);
    assert!(
        err.contains("`data`") && err.contains("no `validation` split; it has test, train"),
        "{err}"
    );
    std::fs::remove_dir_all(&cache).unwrap();
}

/// `--method kto` trains on unpaired examples: labels read per row, the held-out share split
/// off before each example gets its KL completion, and KTOTrainer's metrics in the log.
#[test]
fn kto_trains_on_unpaired_examples() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let dir = scratch("kto");
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("unpaired.jsonl");
    let lines: String = [
        ("The sky is", " blue.", true),
        ("The sky is", " green.", false),
        ("Two plus two is", " four.", true),
        ("Two plus two is", " five.", false),
        ("Water is", " wet.", true),
        ("Water is", " dry.", false),
        ("Cats like to", " nap.", true),
        ("Cats like to", " bark.", false),
    ]
    .iter()
    .map(|(p, c, l)| format!("{{\"prompt\": \"{p}\", \"completion\": \"{c}\", \"label\": {l}}}\n"))
    .collect();
    std::fs::write(&data, lines).unwrap();
    let out = dir.join("out");
    let run = prefer()
        .args(["train", "--model"])
        .arg(fixtures.join("llama/gqa_f32"))
        .arg("--data")
        .arg(&data)
        .args(["--method", "kto", "--per-device-train-batch-size", "2"])
        .args([
            "--eval-ratio",
            "0.25",
            "--max-steps",
            "2",
            "--logging-steps",
            "1",
        ])
        .args(["--eval-strategy", "steps", "--eval-steps", "2"])
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("6 training examples, 2 held out"),
        "{stdout}"
    );
    let log = rows(&out);
    let train = log.iter().find(|r| r.get("loss").is_some()).unwrap();
    for k in ["kl", "num_examples"] {
        assert!(
            train[k].as_f64().is_some_and(f64::is_finite),
            "{k}: {train}"
        );
    }
    assert!(log.iter().any(|r| r.get("eval_kl").is_some()), "{log:?}");

    // A batch of one has no neighbour to take a KL completion from.
    let run = prefer()
        .args(["train", "--model"])
        .arg(fixtures.join("llama/gqa_f32"))
        .arg("--data")
        .arg(&data)
        .args(["--method", "kto", "--per-device-train-batch-size", "1"])
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    assert!(
        stderr(&run).contains("per_device_train_batch_size"),
        "{}",
        stderr(&run)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `prefer train` as machine `rank` of 2 joined on `port`, writing into `out`.
fn machine(rank: usize, port: u16, out: &Path, extra: &[&str]) -> Process {
    let mut p = Process::new(assert_cmd::cargo::cargo_bin("prefer"));
    p.args(["train", "--num-machines", "2", "--machine-rank"])
        .arg(rank.to_string())
        .args(["--main-process-port", &port.to_string(), "--output"])
        .arg(out)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    p
}

/// Machines 0 and 1 run to the end, writing into `zero` and `first`: their outputs, in that order.
fn run_machines(port: u16, zero: &Path, first: &Path, extra: &[&str]) -> (Output, Output) {
    let second = machine(1, port, first, extra).spawn().unwrap();
    let main = machine(0, port, zero, extra).spawn().unwrap();
    (
        main.wait_with_output().unwrap(),
        second.wait_with_output().unwrap(),
    )
}

/// A port for this test process's machines (tests of other processes may run beside).
fn port(offset: u16) -> u16 {
    30_000 + (std::process::id() % 10_000) as u16 * 2 + offset
}

/// Two `prefer train` processes joined over localhost (machines 0 and 1, one CPU replica each)
/// train, bit for bit, the adapter one process trains over two CPU replicas; machine 0 writes
/// the outputs, machine 1 none of them.
#[test]
fn two_machines_train_what_one_machine_with_two_devices_trains() {
    let (one, zero, first) = (
        scratch("dp-devices"),
        scratch("dp-machine-0"),
        scratch("dp-machine-1"),
    );
    let steps = ["--max-steps", "4", "--eval-steps", "2"];
    let run = prefer()
        .args(["train", "--devices", "cpu,cpu", "--output"])
        .arg(&one)
        .args(steps)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("on flex × 2 devices"), "{stdout}");
    let port = port(0);
    let (main, second) = run_machines(port, &zero, &first, &steps);
    assert!(main.status.success(), "machine 0: {}", stderr(&main));
    assert!(second.status.success(), "machine 1: {}", stderr(&second));
    let adapter = |d: &Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(adapter(&one), adapter(&zero));
    assert_eq!(rows(&one).len(), rows(&zero).len());
    assert!(!first.join("adapter").exists() && !first.join("metrics.jsonl").exists());
    for d in [one, zero, first] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// A machine killed mid-run stops the other with one line naming it; the run resumes from its
/// last checkpoint, here on one machine with two devices (the same joint batch).
#[test]
fn a_killed_machine_stops_the_other_and_the_run_resumes() {
    let (zero, first) = (scratch("dp-kill-0"), scratch("dp-kill-1"));
    let steps = [
        "--max-steps",
        "40",
        "--save-steps",
        "1",
        "--eval-steps",
        "0",
    ];
    let port = port(1);
    let mut second = machine(1, port, &first, &steps).spawn().unwrap();
    let main = machine(0, port, &zero, &steps).spawn().unwrap();
    let started = std::time::Instant::now();
    while !zero.join("checkpoint-1").is_dir() && started.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    second.kill().unwrap();
    let _ = second.wait();
    let main = main.wait_with_output().unwrap();
    assert!(
        !main.status.success(),
        "machine 0 went on without machine 1"
    );
    let message = stderr(&main);
    assert!(message.contains("machine 1 stopped"), "{message}");
    let resumed = prefer()
        .args(["train", "--devices", "cpu,cpu", "--resume", "--output"])
        .arg(&zero)
        .args(steps)
        .output()
        .unwrap();
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(stderr(&resumed).contains("resumed from"));
    for d in [zero, first] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// Machines that resume from different checkpoints (output directories that are not shared) are
/// refused before the first step, naming the replica that differs.
#[test]
fn machines_that_resume_from_different_checkpoints_are_refused() {
    let (zero, first) = (scratch("dp-stale-0"), scratch("dp-stale-1"));
    let run = prefer()
        .args([
            "train",
            "--max-steps",
            "2",
            "--save-steps",
            "1",
            "--eval-steps",
            "0",
        ])
        .args(["--per-device-train-batch-size", "8", "--output"])
        .arg(&zero)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    // Machine 1's directory holds only the older checkpoint.
    std::fs::create_dir_all(first.join("checkpoint-1")).unwrap();
    for entry in walk(&zero.join("checkpoint-1")) {
        let target = first.join(entry.strip_prefix(&zero).unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &target).unwrap();
    }
    let steps = [
        "--max-steps",
        "4",
        "--eval-steps",
        "0",
        "--per-device-train-batch-size",
        "4",
        "--resume",
    ];
    let port = port(2);
    let (main, second) = run_machines(port, &zero, &first, &steps);
    assert!(!main.status.success() && !second.status.success());
    let message = stderr(&main);
    assert!(
        message
            .contains("replica 1: starts at step 1 with another adapter than rank 0 (at step 2)"),
        "{message}"
    );
    for d in [zero, first] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// The files under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
