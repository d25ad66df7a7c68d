//! The `prefer` binary: arguments, error lines and exit codes, and generation end to end.

use std::path::PathBuf;

use assert_cmd::Command;

fn prefer() -> Command {
    Command::cargo_bin("prefer").expect("binary built")
}

fn tiny_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama/gqa_f32")
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn help_lists_examples() {
    let out = prefer().args(["generate", "--help"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Examples:") && text.contains("--temperature"),
        "{text}"
    );
}

#[test]
fn missing_model_is_one_clear_line() {
    let out = prefer()
        .args(["generate", "--model", "/no/such/model", "--prompt", "hi"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "error: /no/such/model: no such file or directory\n"
    );
}

#[test]
fn bad_arguments_are_rejected() {
    let out = prefer()
        .args(["generate", "--prompt", "hi"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--model <MODEL>"), "{}", stderr(&out));

    let out = prefer()
        .args([
            "generate",
            "--model",
            "m",
            "--prompt",
            "p",
            "--backend",
            "tpu",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unknown backend `tpu` (expected ndarray, flex, wgpu or cuda)"));

    let out = prefer()
        .args(["generate", "--model"])
        .arg(tiny_model())
        .args(["--prompt", "p", "--top-p", "1.5"])
        .output()
        .unwrap();
    assert_eq!(stderr(&out), "error: --top-p must be in (0, 1] (got 1.5)\n");
}

#[test]
fn backend_not_compiled_in_is_named() {
    #[cfg(not(feature = "cuda"))]
    {
        let out = prefer()
            .args(["generate", "--model"])
            .arg(tiny_model())
            .args(["--prompt", "p", "--backend", "cuda"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(
            stderr(&out),
            "error: backend `cuda` is not compiled into this binary; rebuild with `--features cuda`\n"
        );
    }
}

#[test]
fn greedy_generation_streams_what_the_library_generates() {
    use prefer::llama::{SamplingConfig, generate, load_dense};
    type B = burn::backend::NdArray;
    let prompt = "The capital of France";
    let (model, tok) = load_dense::<B>(&tiny_model(), &Default::default()).unwrap();
    let tok = tok.unwrap();
    let ids = tok.encode(prompt, true).unwrap();
    let config = SamplingConfig {
        temperature: 0.0,
        max_new_tokens: 16,
        ..Default::default()
    };
    let stops = [tok.token_id("<|im_end|>").unwrap()];
    let mut out = generate(&model, &ids, &config, &stops, |_| true).unwrap();
    out.retain(|t| !stops.contains(t));
    let expected = tok.decode(&out, true).unwrap();
    assert!(!expected.is_empty());

    let run = prefer()
        .args(["generate", "--model"])
        .arg(tiny_model())
        .args([
            "--prompt",
            prompt,
            "--temperature",
            "0",
            "--max-new-tokens",
            "16",
        ])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(
        String::from_utf8(run.stdout).unwrap(),
        format!("{expected}\n")
    );
}

/// Several prompts and completions per prompt come out of one batch as JSON Lines; greedy rows
/// equal what each prompt streams alone.
#[test]
fn several_prompts_are_generated_in_one_batch() {
    let alone = |prompt: &str| {
        let out = prefer()
            .args(["generate", "--model"])
            .arg(tiny_model())
            .args([
                "--prompt",
                prompt,
                "--temperature",
                "0",
                "--max-new-tokens",
                "8",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8(out.stdout)
            .unwrap()
            .trim_end_matches('\n')
            .to_string()
    };
    let prompts = ["The capital of France", "Hi"];
    let out = prefer()
        .args(["generate", "--model"])
        .arg(tiny_model())
        .args(["--prompt", prompts[0], "--prompt", prompts[1]])
        .args(["--num-return-sequences", "2", "--temperature", "0"])
        .args(["--max-new-tokens", "8"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4);
    for (i, row) in rows.iter().enumerate() {
        let prompt = prompts[i / 2];
        assert_eq!(row["prompt"], prompt);
        assert_eq!(
            row["completion"].as_str().unwrap(),
            alone(prompt),
            "row {i}"
        );
    }
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let run = |seed: &str| {
        let out = prefer()
            .args(["generate", "--model"])
            .arg(tiny_model())
            .args([
                "--chat",
                "--prompt",
                "Hi",
                "--temperature",
                "1.0",
                "--max-new-tokens",
                "12",
                "--seed",
                seed,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        out.stdout
    };
    assert_eq!(run("5"), run("5"));
}

#[test]
fn quantize_then_generate_in_nf4() {
    let out = std::env::temp_dir().join(format!("prefer-cli-quant-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = prefer()
        .args(["quantize", "--model"])
        .arg(tiny_model())
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    let text = String::from_utf8_lossy(&run.stdout);
    assert!(
        text.contains("quantised 14 Linear weights") && text.contains("4.127 nominal"),
        "{text}"
    );
    let run = prefer()
        .args(["generate", "--model"])
        .arg(&out)
        .args([
            "--prompt",
            "Hello",
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
        ])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    let _ = std::fs::remove_dir_all(&out);

    let run = prefer()
        .args(["quantize", "--model"])
        .arg(tiny_model())
        .args(["--output", "x", "--block-size", "48"])
        .output()
        .unwrap();
    assert_eq!(
        stderr(&run),
        "error: --block-size must be a power of two from 32 to 4096 (got 48)\n"
    );
    let run = prefer()
        .args(["quantize", "--model", "/no/dir", "--output", "x"])
        .output()
        .unwrap();
    assert_eq!(
        stderr(&run),
        "error: /no/dir: expected a Hugging Face model directory (with config.json)\n"
    );
}

#[test]
fn merge_reports_a_missing_adapter() {
    let run = prefer()
        .args(["merge", "--model"])
        .arg(tiny_model())
        .args(["--adapter", "/no/adapter", "--output", "/tmp/x"])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    assert_eq!(
        stderr(&run),
        "error: /no/adapter/adapter_config.json: No such file or directory (os error 2)\n"
    );
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[test]
fn eval_reports_trls_numbers_as_json() {
    let data = std::env::temp_dir().join(format!("prefer-eval-{}.jsonl", std::process::id()));
    let rows: Vec<String> = std::fs::read_to_string(fixtures().join("dpo/standard.jsonl"))
        .unwrap()
        .lines()
        .take(4)
        .map(str::to_owned)
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    // Both CPU backends of the default build.
    for backend in ["ndarray", "flex"] {
        let run = prefer()
            .args(["eval", "--model"])
            .arg(tiny_model())
            .arg("--adapter")
            .arg(fixtures().join("dpo/adapter"))
            .arg("--data")
            .arg(&data)
            .arg("--json")
            .args(["--backend", backend])
            .output()
            .unwrap();
        assert!(run.status.success(), "{}", stderr(&run));
        let out: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
        let trl: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join("dpo/losses.json")).unwrap(),
        )
        .unwrap();
        let want = &trl["losses"]["label_smoothing_0.1"]["sigmoid"];
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 + 1e-4 * b.abs();
        assert!(
            close(
                out["metrics"]["loss"].as_f64().unwrap(),
                want["loss"].as_f64().unwrap()
            ),
            "{backend}: {out}"
        );
        for m in [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ] {
            assert!(
                close(
                    out["metrics"][m].as_f64().unwrap(),
                    want["metrics"][m].as_f64().unwrap()
                ),
                "{backend} {m}: {out}"
            );
        }
        let pairs = out["pairs"].as_array().unwrap();
        assert_eq!(pairs.len(), 4);
        let first = trl["per_pair"]["reference_chosen_logps"][0]
            .as_f64()
            .unwrap();
        assert!(
            close(pairs[0]["ref_logps/chosen"].as_f64().unwrap(), first),
            "{backend}"
        );
    }
    // `--method`: the reference-free trainers' loss and metrics, TRL's CPOTrainer / ORPOTrainer;
    // KTOTrainer's on the pairs split into 8 examples, one batch of 8 as TRL's.
    let trl: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("dpo/losses.json")).unwrap())
            .unwrap();
    for (method, extra, name, metric) in [
        ("orpo", vec![], "orpo", "log_odds_ratio"),
        ("simpo", vec!["--beta", "2.0"], "simpo", "rewards/margins"),
        ("cpo", vec![], "cpo", "nll_loss"),
        ("kto", vec!["--batch-size", "8"], "kto", "kl"),
    ] {
        let run = prefer()
            .args(["eval", "--model"])
            .arg(tiny_model())
            .arg("--adapter")
            .arg(fixtures().join("dpo/adapter"))
            .arg("--data")
            .arg(&data)
            .args(["--json", "--method", method])
            .args(extra)
            .output()
            .unwrap();
        assert!(run.status.success(), "{method}: {}", stderr(&run));
        let out: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
        let want = &trl["other_trainers"][name];
        for (got, expected) in [
            (&out["metrics"]["loss"], &want["loss"]),
            (&out["metrics"][metric], &want["metrics"][metric]),
        ] {
            let (g, w) = (got.as_f64().unwrap(), expected.as_f64().unwrap());
            assert!((g - w).abs() <= 1e-5 + 1e-5 * w.abs(), "{method}: {out}");
        }
        if method == "kto" {
            let examples = out["pairs"].as_array().unwrap();
            let labels: Vec<bool> = examples
                .iter()
                .map(|e| e["label"].as_bool().unwrap())
                .collect();
            assert_eq!(labels, [true, true, true, true, false, false, false, false]);
        } else {
            assert!(out["metrics"].get("kl").is_none(), "{method}: {out}");
        }
    }
    let refused = prefer()
        .args(["eval", "--model"])
        .arg(tiny_model())
        .arg("--ref-adapter")
        .arg(fixtures().join("dpo/adapter"))
        .arg("--data")
        .arg(&data)
        .args(["--method", "orpo"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("uses no reference"),
        "{}",
        stderr(&refused)
    );
    let _ = std::fs::remove_file(&data);
}

#[test]
fn eval_stops_at_a_bad_row_before_loading_the_model() {
    let data = std::env::temp_dir().join(format!("prefer-eval-bad-{}.jsonl", std::process::id()));
    std::fs::write(
        &data,
        "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"a\"}\n",
    )
    .unwrap();
    let run = prefer()
        .args(["eval", "--model"])
        .arg(tiny_model())
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    assert_eq!(
        stderr(&run),
        format!("error: {}:2: missing field `chosen`\n", data.display())
    );
    let run = prefer()
        .args(["eval", "--model"])
        .arg(tiny_model())
        .arg("--data")
        .arg(&data)
        .args(["--on-bad-row", "skip"])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(
        stderr(&run),
        "skipped 1 bad rows of 2 (on_bad_row = skip)\n"
    );
    let run = prefer()
        .args(["eval", "--model"])
        .arg(tiny_model())
        .arg("--data")
        .arg(&data)
        .args(["--loss-type", "dpo"])
        .output()
        .unwrap();
    assert!(
        stderr(&run).contains("unknown loss_type `dpo`"),
        "{}",
        stderr(&run)
    );
    let _ = std::fs::remove_file(&data);
}

#[test]
fn inspect_summarises_models_adapters_and_datasets() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let out = prefer().arg("inspect").arg(tiny_model()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        text.contains("parameters   143.7 k") && text.contains("32.00 bits per parameter"),
        "{text}"
    );
    let out = prefer()
        .arg("inspect")
        .arg(fixtures.join("dpo/adapter"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("r 4, lora_alpha 8") && text.contains("in 14 projections"),
        "{text}"
    );
    let out = prefer()
        .arg("inspect")
        .arg(fixtures.join("lora/peft_dora"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("(PEFT DoRA)"), "{text}");
    let out = prefer()
        .arg("inspect")
        .arg(fixtures.join("dpo/standard.jsonl"))
        .arg("--model")
        .arg(tiny_model())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("5 usable, 0 bad; format standard") && text.contains("P50"),
        "{text}"
    );
    assert!(
        text.contains("with max_length 1024: 0 of 5 pairs would be dropped"),
        "{text}"
    );
    // Lengths too short for the prompts: the rows a run would drop are counted up front.
    let out = prefer()
        .arg("inspect")
        .arg(fixtures.join("dpo/standard.jsonl"))
        .arg("--model")
        .arg(tiny_model())
        .args(["--max-length", "3"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("with max_length 3: 5 of 5 pairs would be dropped")
            && text.contains("set --max-prompt-length"),
        "{text}"
    );
    let out = prefer()
        .args(["inspect", "/no/such/thing"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "error: /no/such/thing: no such file or directory\n"
    );
}

#[test]
fn every_command_has_examples_in_its_help() {
    for cmd in [
        "train", "eval", "generate", "quantize", "merge", "inspect", "pairs",
    ] {
        let out = prefer().args([cmd, "--help"]).output().unwrap();
        assert!(out.status.success(), "{cmd}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Examples:"),
            "{cmd} --help has no examples"
        );
    }
}

/// A Hub id is read from the local Hugging Face cache (`HF_HUB_CACHE`), offline; one that is not
/// there says where it looked and how to fetch it.
#[test]
fn hub_ids_resolve_in_the_local_cache() {
    let cache = std::env::temp_dir().join(format!("prefer-hub-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    let repo = cache.join("models--Org--tiny-llama");
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for e in std::fs::read_dir(tiny_model()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), snapshot.join(e.file_name())).unwrap();
    }
    let generate = |id: &str| {
        prefer()
            .env("HF_HUB_CACHE", &cache)
            .current_dir(&cache)
            .args([
                "generate",
                "--model",
                id,
                "--prompt",
                "Hi",
                "--temperature",
                "0",
            ])
            .args(["--max-new-tokens", "4"])
            .output()
            .unwrap()
    };
    let from_id = generate("Org/tiny-llama");
    assert!(from_id.status.success(), "{}", stderr(&from_id));
    let from_path = prefer()
        .arg("generate")
        .arg("--model")
        .arg(tiny_model())
        .args([
            "--prompt",
            "Hi",
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
        ])
        .output()
        .unwrap();
    assert_eq!(from_id.stdout, from_path.stdout);
    let missing = generate("Org/absent");
    assert_eq!(missing.status.code(), Some(1));
    let err = stderr(&missing);
    assert!(
        err.contains("`Org/absent` is neither a local path nor in the Hugging Face cache")
            && err.contains(&format!("looked in {}", cache.display()))
            && err.contains("hf download Org/absent"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    std::fs::remove_dir_all(&cache).unwrap();
}

/// `prefer pairs` writes TRL-format pairs that prefer reads back, and a bad row stops it with the
/// row and the key before anything is written.
#[test]
fn pairs_are_made_from_scores_and_single_responses() {
    let dir = std::env::temp_dir().join(format!("prefer-pairs-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let scored = dir.join("scored.jsonl");
    std::fs::write(
        &scored,
        concat!(
            "{\"prompt\": \"Capital of France?\", \"response\": \"Paris.\", \"score\": 9}\n",
            "{\"prompt\": \"Capital of France?\", \"response\": \"Lyon.\", \"score\": 2}\n",
            "{\"prompt\": \"Capital of France?\", \"response\": \"It is Paris.\", \"score\": 8.8}\n",
            "{\"prompt\": \"Capital of France?\", \"response\": \"Nice.\", \"score\": 8.5}\n",
            "{\"prompt\": \"2 + 2?\", \"response\": \"4\", \"score\": 1}\n",
        ),
    )
    .unwrap();
    let out_file = dir.join("pairs.jsonl");
    let out = prefer()
        .args(["pairs", "--from-scored"])
        .arg(&scored)
        .arg("--output")
        .arg(&out_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("1 pairs from 5 rows of 2 prompts; dropped: 0 ties, 1 below --min-score-diff 0.5, 1 prompts with a single response"),
        "{text}"
    );
    let line = std::fs::read_to_string(&out_file).unwrap();
    let pair: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(
        (pair["chosen"].as_str(), pair["rejected"].as_str()),
        (Some("Paris."), Some("Lyon."))
    );
    assert_eq!(
        (
            pair["chosen_score"].as_f64(),
            pair["rejected_score"].as_f64()
        ),
        (Some(9.0), Some(2.0))
    );
    // prefer reads what it wrote as standard preference data.
    let out = prefer().arg("inspect").arg(&out_file).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("1 usable, 0 bad; format standard"), "{text}");

    let single = dir.join("single.jsonl");
    std::fs::write(
        &single,
        "{\"prompt\": \"Why?\", \"response\": \"Because it rains. The ground is wet. So we stay in.\"}\n",
    )
    .unwrap();
    let shuffled = dir.join("shuffled.jsonl");
    let out = prefer()
        .args(["pairs", "--reject", "shuffle", "--from-single"])
        .arg(&single)
        .arg("--output")
        .arg(&shuffled)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let pair: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&shuffled).unwrap().trim()).unwrap();
    assert_ne!(pair["chosen"], pair["rejected"]);
    assert_eq!(pair["metadata"]["reject"], "shuffle");

    // A row without a score: the error names the file, the line and the key; nothing is written.
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"response\": \"x\", \"score\": 1}\n{\"prompt\": \"a\", \"response\": \"y\"}\n",
    )
    .unwrap();
    let nothing = dir.join("nothing.jsonl");
    let out = prefer()
        .args(["pairs", "--from-scored"])
        .arg(&bad)
        .arg("--output")
        .arg(&nothing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!("error: {}:2: missing key `score`\n", bad.display())
    );
    assert!(!nothing.exists());
    // Neither source: clap says which flags are needed.
    let out = prefer()
        .args(["pairs", "--output"])
        .arg(&nothing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--from-scored"), "{}", stderr(&out));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `prefer pairs --from-prompts`: samples from the model (with an adapter), scores them with a
/// judge, pairs each prompt's best with its worst, repeats exactly with the same seed, and a judge
/// command that fails or prints the wrong number of lines stops it with nothing written.
#[test]
fn pairs_are_made_from_the_models_own_samples() {
    let dir = std::env::temp_dir().join(format!("prefer-pairs-prompts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prompts = dir.join("prompts.jsonl");
    std::fs::write(
        &prompts,
        concat!(
            "{\"prompt\": \"Once upon a time\"}\n",
            "{\"prompt\": \"The capital of France is\", \"reference\": \"Paris\"}\n",
            "{\"prompt\": \"Hello\"}\n",
        ),
    )
    .unwrap();
    let run = |judge: &str, out: &std::path::Path| {
        prefer()
            .args(["pairs", "--from-prompts"])
            .arg(&prompts)
            .arg("--model")
            .arg(tiny_model())
            .arg("--adapter")
            .arg(fixtures().join("dpo/adapter"))
            .args([
                "--samples",
                "4",
                "--max-new-tokens",
                "6",
                "--min-score-diff",
                "1",
            ])
            .args(["--judge", judge, "--seed", "3", "--output"])
            .arg(out)
            .output()
            .unwrap()
    };
    let first = dir.join("pairs.jsonl");
    let out = run("length", &first);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("from 12 completions of 3 prompts (judge length)"),
        "{text}"
    );
    let written = std::fs::read_to_string(&first).unwrap();
    let pairs: Vec<serde_json::Value> = written
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!pairs.is_empty(), "{text}");
    for p in &pairs {
        let (c, r) = (
            p["chosen"].as_str().unwrap(),
            p["rejected"].as_str().unwrap(),
        );
        assert_eq!(
            p["chosen_score"].as_f64().unwrap(),
            c.chars().count() as f64
        );
        assert_eq!(
            p["rejected_score"].as_f64().unwrap(),
            r.chars().count() as f64
        );
        assert!(c.chars().count() > r.chars().count(), "{p}");
    }
    // The same seed samples the same completions.
    let again = dir.join("again.jsonl");
    let out = run("length", &again);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&again).unwrap(), written);
    // A judge command: here each score is the length of the completion's JSON line.
    let by_command = dir.join("by_command.jsonl");
    let out = run("command:awk '{ print length($0) }'", &by_command);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("(judge command:awk"));
    assert!(by_command.is_file());
    // A failing judge and a judge with too few lines: an error naming the judge, no output.
    for (judge, says) in [
        ("command:echo broken >&2; exit 2", "broken"),
        ("command:echo 1", "printed 1 lines for"),
    ] {
        let out_file = dir.join("never.jsonl");
        let out = run(judge, &out_file);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(
            err.contains(says) && err.contains("judge `command:"),
            "{err}"
        );
        assert!(!out_file.exists());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `examples/iterative_dpo.sh`: two rounds of sample → judge → pairs → train on the built-in task;
/// the judge's score of the policy's samples and its accuracy on held-out judged pairs rise.
#[test]
fn iterative_dpo_example_raises_the_judged_accuracy() {
    let out = std::env::temp_dir().join(format!("prefer-iterative-{}", std::process::id()));
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/iterative_dpo.sh");
    let run = Command::new("bash")
        .arg(&script)
        .arg(&out)
        .env("PREFER", assert_cmd::cargo::cargo_bin("prefer"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{text}\n{}", stderr(&run));
    // "round N...: judge score S, held-out accuracy A"
    let rounds: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with("round "))
        .map(|l| {
            let number = |key: &str| -> f64 {
                let rest = &l[l.find(key).unwrap() + key.len()..];
                rest.split(|c: char| c == ',' || c.is_whitespace())
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            };
            (number("judge score "), number("held-out accuracy "))
        })
        .collect();
    assert_eq!(rounds.len(), 3, "{text}");
    assert_eq!(rounds[0].1, 0.0, "the base against itself: {text}");
    assert!(rounds[1].1 > 0.5 && rounds[2].1 > 0.5, "{text}");
    assert!(rounds[2].0 > rounds[0].0, "{text}");
    std::fs::remove_dir_all(&out).unwrap();
}
