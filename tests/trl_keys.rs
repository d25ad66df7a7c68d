//! A TRL recipe runs unchanged: every key of TRL 1.16 that `trl dpo --config` reads has an answer
//! (the key list and defaults are `tests/fixtures/trl_keys.json`, generated from TRL by
//! `tools/make_trl_keys.py`), prefer's defaults are TRL's wherever a key means the same, and TRL's
//! files load — a YAML recipe and a `DPOConfig.to_dict()` dump.

use std::path::{Path, PathBuf};

use prefer::{
    ConfigFile, RunConfig,
    dpo::{
        data::TruncationMode,
        train::{ComputeDtype, IntervalStrategy, LrSchedulerType, SaveStrategy},
    },
    trl_keys::{Answer, Source, TRL_KEYS, UNSET_BOOLS, trl_key},
};
use serde_json::{Map, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn trl() -> Value {
    let text = std::fs::read_to_string(fixtures().join("trl_keys.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// The declared default of each key `trl dpo` reads, from the class that owns it there.
fn trl_defaults(trl: &Value) -> Map<String, Value> {
    let mut out = Map::new();
    for class in [
        "ScriptArguments",
        "DPOConfig",
        "ModelConfig",
        "DatasetMixtureConfig",
    ] {
        for row in trl["classes"][class].as_array().unwrap() {
            let name = row["name"].as_str().unwrap().to_string();
            out.entry(name).or_insert(row["default"].clone());
        }
    }
    out
}

#[test]
fn every_trl_key_has_an_answer_with_trls_default() {
    let trl = trl();
    let defaults = trl_defaults(&trl);
    let cli = trl["trl_dpo_cli"].as_array().unwrap();
    assert_eq!(cli.len(), 167, "TRL 1.16's `trl dpo` reads 167 keys");
    for name in cli {
        let name = name.as_str().unwrap();
        let row = trl_key(name).unwrap_or_else(|| panic!("TRL key `{name}` has no answer"));
        assert!(
            same(&row.default_value(), &defaults[name]),
            "`{name}`: the table says TRL's default is {}, TRL says {}",
            row.default,
            defaults[name]
        );
    }
    // The booleans without a default, which `--key` alone sets.
    let mut unset_bools: Vec<&str> = ["DPOConfig", "ModelConfig", "ScriptArguments"]
        .iter()
        .flat_map(|c| trl["classes"][*c].as_array().unwrap())
        .filter(|r| r["type"] == "bool | None")
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    unset_bools.sort();
    unset_bools.dedup();
    let mut ours = UNSET_BOOLS.to_vec();
    ours.sort();
    assert_eq!(ours, unset_bools);
    let keys = RunConfig::keys();
    for row in TRL_KEYS {
        match row.answer {
            Answer::Same => assert!(keys.contains(&row.name.to_string()), "`{}`", row.name),
            Answer::Alias(to) => assert!(keys.contains(&to.to_string()), "`{}` → `{to}`", row.name),
            Answer::Inert(_) | Answer::Refused(_) => assert!(
                !keys.contains(&row.name.to_string()),
                "`{}` is a prefer key but its row does not pass it on",
                row.name
            ),
            // A check decides per value (`warmup_steps` below 1 is `warmup_ratio`).
            Answer::Check(_) => {}
        }
    }
}

/// Where a key means the same in both, prefer's default is TRL's, except these, each for a reason.
#[test]
fn prefers_defaults_are_trls_where_the_key_means_the_same() {
    let differ: [(&str, &str); 10] = [
        ("output_dir", "TRL: trainer_output; prefer: runs/dpo"),
        ("evaluation_strategy", "eval_strategy under its older name"),
        (
            "eval_strategy",
            "unset: evaluate when there are held-out pairs",
        ),
        (
            "padding_free",
            "unset: padding-free on the CPU backends, where it is faster",
        ),
        (
            "lora_r",
            "prefer takes PEFT's LoraConfig defaults; a TRL recipe gets ModelConfig's",
        ),
        ("lora_alpha", "the same"),
        ("lora_dropout", "the same"),
        (
            "load_in_4bit",
            "prefer's default is QLoRA's NF4 base; a TRL recipe gets ModelConfig's",
        ),
        ("use_bnb_nested_quant", "the same"),
        (
            "gradient_checkpointing",
            "opt-in: the same numbers, and prefer's step already holds a fraction of TRL's memory",
        ),
    ];
    let prefer = serde_json::to_value(RunConfig::default()).unwrap();
    for row in TRL_KEYS {
        let to = match row.answer {
            Answer::Same => row.name,
            Answer::Alias(to) => to,
            _ => continue,
        };
        let ours = prefer.get(to).cloned().unwrap_or(Value::Null);
        let theirs = row.default_value();
        let explained = differ.iter().any(|(k, _)| *k == row.name);
        // `null` in TRL means "not set": prefer's own default then applies.
        let unset = theirs.is_null();
        if explained {
            assert!(
                !same(&ours, &theirs),
                "`{}` no longer differs: drop it from the list",
                row.name
            );
        } else if !unset {
            assert!(
                same(&ours, &theirs),
                "`{}`: prefer's default {ours}, TRL's {theirs}",
                row.name
            );
        }
    }
}

#[test]
fn a_dpo_config_dump_loads_with_trls_values() {
    let trl = trl();
    let dump = trl["effective"]["DPOConfig"].as_object().unwrap().clone();
    assert_eq!(dump.len(), 139);
    let loaded = RunConfig::from_table(dump, Source::Prefer).unwrap();
    let warned: Vec<&str> = loaded
        .warnings
        .iter()
        .map(|w| w.split('`').nth(1).unwrap_or(w).split(' ').next().unwrap())
        .collect();
    assert_eq!(
        loaded.warnings.len(),
        1,
        "only what needs several devices: {:#?}",
        loaded.warnings
    );
    assert!(warned.contains(&"accelerator_config"), "{warned:?}");
    let c = loaded.config.train;
    assert_eq!(c.output_dir, PathBuf::from("trainer_output"));
    assert_eq!(c.eval_strategy, Some(IntervalStrategy::No));
    assert_eq!(c.save_strategy, SaveStrategy::Steps);
    assert_eq!(c.padding_free, Some(false));
    assert_eq!(c.max_length, Some(1024));
    assert_eq!(c.learning_rate, 1e-6);
    assert!(c.disable_dropout);
    assert!(
        c.gradient_checkpointing,
        "both names of the option, one value"
    );
    assert_eq!(
        c.metric_for_best_model, "eval_loss",
        "null leaves prefer's default"
    );
    c.validate().unwrap();
}

#[test]
fn a_trl_qlora_recipe_loads_unchanged() {
    let file = ConfigFile::read(&fixtures().join("recipes/dpo_qlora.yaml")).unwrap();
    assert_eq!(file.source, Source::TrlRecipe);
    let loaded = RunConfig::from_table(file.table.clone(), file.source).unwrap();
    let mut warned: Vec<String> = loaded
        .warnings
        .iter()
        .map(|w| {
            w.split('`')
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    warned.sort();
    assert_eq!(
        warned,
        [
            "dataset_num_proc",
            "gradient_checkpointing_kwargs",
            "optim",
            "report_to",
        ],
        "{:#?}",
        loaded.warnings
    );
    let run = loaded.config;
    assert_eq!(run.model, Some(PathBuf::from("runs/smol")));
    let c = &run.train;
    // What the recipe sets, under prefer's names.
    assert_eq!(
        (c.r, c.target_modules.clone()),
        (32, vec!["all-linear".to_string()])
    );
    assert!(c.load_in_4bit && c.bnb_4bit_use_double_quant);
    assert!(c.gradient_checkpointing);
    assert_eq!(c.compute_dtype(), ComputeDtype::Float32, "bf16: false");
    // What it leaves out takes ModelConfig's defaults, as `trl dpo` would.
    assert_eq!((c.lora_alpha, c.lora_dropout), (32.0, 0.05));
    assert_eq!(c.learning_rate, 5e-6);
    assert_eq!(c.lr_scheduler_type, LrSchedulerType::Cosine);
    assert_eq!((c.warmup_ratio, c.warmup_steps), (0.1, 0));
    assert_eq!(c.truncation_mode, TruncationMode::KeepEnd);
    assert_eq!((c.max_length, c.padding_free), (Some(512), Some(true)));
    assert_eq!(c.eval_strategy, Some(IntervalStrategy::Steps));
    assert_eq!((c.eval_steps, c.save_steps), (Some(50), 100));
    assert!(c.load_best_model_at_end && c.logging_first_step);
    assert_eq!(c.best_metric(), "eval_rewards/accuracies");
    assert!(c.greater_is_better());
    assert_eq!((c.seed, c.gradient_accumulation_steps), (7, 8));
    c.validate().unwrap();
}

/// A key set to something prefer cannot do is refused, naming the key, its line and what to do.
#[test]
fn what_prefer_cannot_do_is_refused_with_the_key_and_its_line() {
    let dir = std::env::temp_dir().join(format!("prefer-trl-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let recipe = std::fs::read_to_string(fixtures().join("recipes/dpo_qlora.yaml")).unwrap();
    for (from, to, key, says) in [
        (
            "push_to_hub: false",
            "push_to_hub: true",
            "push_to_hub",
            "hf upload",
        ),
        (
            "optim: paged_adamw_8bit",
            "optim: adafactor",
            "optim",
            "AdamW",
        ),
        (
            "lora_r: 32",
            "lora_r: 32\nr: 16",
            "r",
            "`lora_r` sets the same option",
        ),
        ("dtype: float32", "dtype: float64", "dtype", "float32"),
        ("use_peft: true", "use_peft: false", "use_peft", "LoRA"),
        ("seed: 7", "sed: 7", "sed", "did you mean `seed`?"),
    ] {
        let path = dir.join("recipe.yaml");
        std::fs::write(&path, recipe.replace(from, to)).unwrap();
        let file = ConfigFile::read(&path).unwrap();
        let err = RunConfig::from_table(file.table.clone(), file.source).unwrap_err();
        assert_eq!(err.key, key, "{err}");
        assert!(err.to_string().contains(says), "{key}: {err}");
        let line = file.line_of(key).unwrap();
        assert!(
            recipe
                .replace(from, to)
                .lines()
                .nth(line - 1)
                .unwrap()
                .starts_with(key),
            "{key} at line {line}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The same run as prefer's TOML and as a TRL recipe in YAML reads the same.
#[test]
fn toml_and_yaml_give_the_same_run() {
    let dir = std::env::temp_dir().join(format!("prefer-trl-formats-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let toml = dir.join("run.toml");
    std::fs::write(
        &toml,
        "model = \"m\"\nbeta = 0.2\nr = 16\nlora_alpha = 32\nlora_dropout = 0.05\n\
         load_in_4bit = false\nbnb_4bit_use_double_quant = false\nloss_type = [\"ipo\"]\n\
         eval_strategy = \"no\"\neval_ratio = 0.0\n",
    )
    .unwrap();
    let yaml = dir.join("run.yaml");
    std::fs::write(
        &yaml,
        "model_name_or_path: m\nbeta: 0.2\nuse_peft: true\nloss_type:\n  - ipo\n",
    )
    .unwrap();
    let json = dir.join("run.json");
    std::fs::write(
        &json,
        r#"{"model_name_or_path": "m", "beta": 0.2, "use_peft": true, "loss_type": ["ipo"]}"#,
    )
    .unwrap();
    let read = |p: &Path| {
        let f = ConfigFile::read(p).unwrap();
        RunConfig::from_table(f.table, f.source).unwrap().config
    };
    let from_toml = read(&toml);
    assert_eq!(from_toml, read(&yaml));
    assert_eq!(from_toml, read(&json));
    let err = ConfigFile::read(&dir.join("run.ini")).unwrap_err();
    assert!(err.to_string().contains(".yaml"), "{err}");
    std::fs::write(&yaml, "beta: 0.2\n  bad indent: [\n").unwrap();
    let err = ConfigFile::read(&yaml).unwrap_err();
    assert!(err.line.is_some(), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// WPO, TR-DPO and DoRA keep TRL's and PEFT's names: a recipe that turns them on trains with them,
/// and a separate `ref_model` cannot follow a synced reference.
#[test]
fn wpo_tr_dpo_and_dora_keys_are_taken_as_trl_names_them() {
    let dir = std::env::temp_dir().join(format!("prefer-trl-wpo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let recipe = std::fs::read_to_string(fixtures().join("recipes/dpo_qlora.yaml"))
        .unwrap()
        .replace("use_weighting: false", "use_weighting: true")
        .replace(
            "sync_ref_model: false",
            "sync_ref_model: true\nref_model_mixup_alpha: 0.5\nref_model_sync_steps: 64",
        )
        .replace("lora_r: 32", "lora_r: 32\nuse_dora: true");
    let path = dir.join("recipe.yaml");
    std::fs::write(&path, &recipe).unwrap();
    let file = ConfigFile::read(&path).unwrap();
    let loaded = RunConfig::from_table(file.table.clone(), file.source).unwrap();
    let c = &loaded.config.train;
    assert!(c.use_weighting && c.sync_ref_model && c.use_dora);
    assert_eq!((c.ref_model_mixup_alpha, c.ref_model_sync_steps), (0.5, 64));
    assert!(c.loss().use_weighting && c.lora().unwrap().use_dora);
    c.validate().unwrap();

    // A model on disk, so that the check reaches the reference.
    let model = fixtures().join("llama/gqa_f32");
    let recipe = recipe.replace(
        "model_name_or_path: runs/smol",
        &format!("model_name_or_path: {}", model.display()),
    );
    let with_ref = dir.join("ref.yaml");
    std::fs::write(
        &with_ref,
        format!("{recipe}\nref_model: {}\n", model.display()),
    )
    .unwrap();
    let file = ConfigFile::read(&with_ref).unwrap();
    let config = RunConfig::from_table(file.table, file.source)
        .unwrap()
        .config;
    let err = config.validate().unwrap_err();
    assert_eq!(err.key, "sync_ref_model", "{err}");
    assert!(err.to_string().contains("remove ref_model"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
