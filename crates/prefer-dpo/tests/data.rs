//! Preference files in every format → the token ids TRL 1.16's `DPOTrainer` produces, truncation as
//! its collator does it, and bad rows reported with `file:line: reason` (fixtures from
//! `tools/make_dpo_fixtures.py`).

use std::path::PathBuf;

use prefer_dpo::data::{
    DataFormat, OnBadRow, TokenizeOptions, TokenizedPair, TruncationMode, check_vocab, collate,
    drop_truncated_away, load_file, load_files, parse_rows, tokenize_rows,
};
use prefer_llama::{ChatTokenizer, Checkpoint};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tokenizer() -> ChatTokenizer {
    Checkpoint::open(&root().join("llama/gqa_f32"))
        .unwrap()
        .tokenizer
        .unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn i64s(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

#[test]
fn every_format_gives_trls_token_ids() {
    let tok = tokenizer();
    for (file, format) in [
        ("standard.jsonl", DataFormat::Standard),
        ("standard_array.json", DataFormat::Standard),
        ("conversational.jsonl", DataFormat::Conversational),
        ("implicit.jsonl", DataFormat::Implicit),
        ("sharegpt.json", DataFormat::ShareGpt),
    ] {
        let path = root().join("dpo").join(file);
        let expected: Value = serde_json::from_str(
            &std::fs::read_to_string(root().join(format!("dpo/{file}.expected.json"))).unwrap(),
        )
        .unwrap();
        let loaded = load_file(&path, None)
            .unwrap()
            .check(OnBadRow::Error)
            .unwrap();
        assert_eq!(loaded.format, Some(format), "{file}");
        let (pairs, bad) = tokenize_rows(&tok, &loaded.rows, TokenizeOptions::default());
        assert!(bad.is_empty(), "{file}: {bad:?}");
        let rows = expected["rows"].as_array().unwrap();
        assert_eq!(pairs.len(), rows.len(), "{file}");
        for (i, (p, e)) in pairs.iter().zip(rows).enumerate() {
            assert_eq!(p.prompt, ids(&e["prompt_ids"]), "{file} row {i}: prompt");
            assert_eq!(p.chosen, ids(&e["chosen_ids"]), "{file} row {i}: chosen");
            assert_eq!(
                p.rejected,
                ids(&e["rejected_ids"]),
                "{file} row {i}: rejected"
            );
        }

        // Truncation in both modes, as TRL's trainer and collator apply it.
        for key in ["truncated", "truncated_keep_end"] {
            let t = &expected[key];
            let max = t["settings"]["max_length"].as_u64().unwrap() as usize;
            let mode = if t["settings"]["truncation_mode"] == "keep_end" {
                TruncationMode::KeepEnd
            } else {
                TruncationMode::KeepStart
            };
            let (kept, dropped) = drop_truncated_away(pairs.clone(), Some(max), mode);
            assert_eq!(
                dropped.len(),
                t["dropped_rows"].as_array().unwrap().len(),
                "{file} {key}: dropped rows"
            );
            for (p, e) in kept.iter().zip(t["rows"].as_array().unwrap()) {
                let b = collate(&[p], 0, Some(max), mode);
                let n = b.shape[1];
                let chosen_len = e["chosen_input_ids"].as_array().unwrap().len();
                let rejected_len = e["rejected_input_ids"].as_array().unwrap().len();
                assert_eq!(
                    &b.input_ids[..chosen_len],
                    i64s(&e["chosen_input_ids"]).as_slice(),
                    "{file} {key}"
                );
                assert_eq!(
                    &b.completion_mask[..chosen_len],
                    i64s(&e["chosen_completion_mask"]).as_slice(),
                    "{file} {key}"
                );
                assert_eq!(
                    &b.input_ids[n..n + rejected_len],
                    i64s(&e["rejected_input_ids"]).as_slice(),
                    "{file} {key}"
                );
                assert_eq!(
                    &b.completion_mask[n..n + rejected_len],
                    i64s(&e["rejected_completion_mask"]).as_slice(),
                    "{file} {key}"
                );
            }
        }
    }
}

#[test]
fn batches_are_chosen_then_rejected_right_padded() {
    let tok = tokenizer();
    let loaded = load_file(&root().join("dpo/standard.jsonl"), None).unwrap();
    let (pairs, _) = tokenize_rows(&tok, &loaded.rows[..2], TokenizeOptions::default());
    let b = collate(
        &pairs.iter().collect::<Vec<_>>(),
        0,
        None,
        TruncationMode::KeepStart,
    );
    let t = b.shape[1];
    assert_eq!(b.shape[0], 4);
    let row = |r: usize| &b.input_ids[r * t..(r + 1) * t];
    let expect = |p: &prefer_dpo::data::TokenizedPair, c: &[u32]| -> Vec<i64> {
        let mut v: Vec<i64> = p.prompt.iter().chain(c).map(|&x| x as i64).collect();
        v.resize(t, 0);
        v
    };
    assert_eq!(row(0), expect(&pairs[0], &pairs[0].chosen).as_slice());
    assert_eq!(row(1), expect(&pairs[1], &pairs[1].chosen).as_slice());
    assert_eq!(row(2), expect(&pairs[0], &pairs[0].rejected).as_slice());
    assert_eq!(row(3), expect(&pairs[1], &pairs[1].rejected).as_slice());
}

#[test]
fn bad_rows_are_named_with_file_line_and_reason() {
    let data = concat!(
        "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n",
        "{\"prompt\": \"a\", \"chosen\": \"b\"\n",
        "{\"prompt\": \"a\", \"rejected\": \"c\"}\n",
        "{\"prompt\": \"a\", \"chosen\": 5, \"rejected\": \"c\"}\n",
        "{\"prompt\": \"  \", \"chosen\": \"b\", \"rejected\": \"c\"}\n",
        "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"b\"}\n",
        "{\"prompt\": \"a\", \"chosen\": \"\", \"rejected\": \"c\"}\n",
        "[1, 2]\n",
    );
    let mut bytes = data.as_bytes().to_vec();
    bytes.extend(b"{\"prompt\": \"\xff\", \"chosen\": \"b\", \"rejected\": \"c\"}\n");
    let loaded = parse_rows("pairs.jsonl", &bytes, None).unwrap();
    assert_eq!(loaded.rows.len(), 1);
    let messages: Vec<String> = loaded.bad.iter().map(ToString::to_string).collect();
    assert_eq!(
        messages,
        [
            "pairs.jsonl:2: malformed JSON: EOF while parsing an object at line 1 column 29",
            "pairs.jsonl:3: missing field `chosen`",
            "pairs.jsonl:4: `chosen` must be a string, found a number",
            "pairs.jsonl:5: `prompt` is empty",
            "pairs.jsonl:6: chosen and rejected are identical",
            "pairs.jsonl:7: `chosen` is empty",
            "pairs.jsonl:8: a row must be a JSON object",
            "pairs.jsonl:9: invalid UTF-8",
        ]
    );
    // The default policy stops at the first; "skip" keeps the good rows and counts the rest.
    assert_eq!(
        loaded
            .clone()
            .check(OnBadRow::Error)
            .unwrap_err()
            .to_string(),
        messages[0]
    );
    let kept = loaded.check(OnBadRow::Skip).unwrap();
    assert_eq!((kept.rows.len(), kept.bad.len()), (1, 8));
}

#[test]
fn bom_crlf_and_formats_mixed_in_a_file() {
    let data = "\u{feff}{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\r\n\r\n{\"prompt\": [{\"role\": \"user\", \"content\": \"x\"}], \"chosen\": [{\"role\": \"assistant\", \"content\": \"y\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"z\"}]}\r\n";
    let loaded = parse_rows("mixed.jsonl", data.as_bytes(), None).unwrap();
    assert_eq!(loaded.rows.len(), 1);
    assert_eq!(
        loaded.bad[0].to_string(),
        "mixed.jsonl:3: row is in the conversational format but the file is standard"
    );

    let arr = "[{\"conversations\": [{\"from\": \"human\", \"value\": \"hi\"}], \"chosen\": {\"from\": \"gpt\", \"value\": \"a\"}, \"rejected\": {\"from\": \"bot\", \"value\": \"b\"}}]";
    let loaded = parse_rows("sg.json", arr.as_bytes(), None).unwrap();
    assert_eq!(
        loaded.bad[0].to_string(),
        "sg.json: row 1: `rejected`: unknown speaker `bot` (valid: system, human, gpt)"
    );
}

#[test]
fn turns_out_of_place_are_bad_rows() {
    // Conversational rows: a completion holds only the assistant's messages.
    let user = r#"{"role": "user", "content": "x"}"#;
    let asst = r#"{"role": "assistant", "content": "y"}"#;
    let other = r#"{"role": "assistant", "content": "z"}"#;
    let rows = [
        format!(r#"{{"prompt": [{user}], "chosen": [{asst}], "rejected": [{other}]}}"#),
        format!(r#"{{"prompt": [{user}], "chosen": [{user}, {asst}], "rejected": [{other}]}}"#),
        format!(r#"{{"prompt": [{user}], "chosen": [{asst}], "rejected": [{other}, {user}]}}"#),
    ];
    let loaded = parse_rows("conv.jsonl", rows.join("\n").as_bytes(), None).unwrap();
    assert_eq!(loaded.rows.len(), 1);
    let messages: Vec<String> = loaded.bad.iter().map(ToString::to_string).collect();
    assert_eq!(messages.len(), 2);
    assert!(
        messages[0].starts_with("conv.jsonl:2: `chosen[0]` has role `user`"),
        "{}",
        messages[0]
    );
    assert!(
        messages[1].starts_with("conv.jsonl:3: `rejected[1]` has role `user`"),
        "{}",
        messages[1]
    );

    // ShareGPT: the prompt ends with the human turn and a system turn comes first.
    let turn = |from: &str, value: &str| format!(r#"{{"from": "{from}", "value": "{value}"}}"#);
    let entry = |conv: &[String]| {
        format!(
            r#"{{"conversations": [{}], "chosen": {}, "rejected": {}}}"#,
            conv.join(", "),
            turn("gpt", "a"),
            turn("gpt", "b")
        )
    };
    let entries = [
        entry(&[turn("system", "s"), turn("human", "hi")]),
        entry(&[turn("human", "hi"), turn("gpt", "hello")]),
        entry(&[
            turn("human", "hi"),
            turn("system", "s"),
            turn("human", "again"),
        ]),
    ];
    let file = format!("[{}]", entries.join(", "));
    let loaded = parse_rows("sg.json", file.as_bytes(), None).unwrap();
    assert_eq!(loaded.rows.len(), 1);
    let messages: Vec<String> = loaded.bad.iter().map(ToString::to_string).collect();
    assert_eq!(
        messages,
        [
            "sg.json: row 2: `conversations[1]`: the conversation must end with a `human` turn \
             (the completions answer it)",
            "sg.json: row 3: `conversations[1]`: a `system` turn must come first",
        ]
    );
    // Skipped and counted under `on_bad_row = skip`; the first stops the default.
    assert!(loaded.clone().check(OnBadRow::Error).is_err());
    assert_eq!(loaded.check(OnBadRow::Skip).unwrap().bad.len(), 2);
}

#[test]
fn token_ids_beyond_the_vocabulary_are_named_with_the_row() {
    let pair = |location: &str, chosen: Vec<u32>| TokenizedPair {
        location: location.into(),
        prompt: vec![1, 2],
        chosen,
        rejected: vec![3],
        label: None,
    };
    let pairs = [
        pair("a.jsonl:1", vec![4]),
        pair("a.jsonl:2", vec![5, 70000]),
    ];
    let err = check_vocab(&pairs, 0, 64).unwrap_err();
    assert_eq!(err.location, "a.jsonl:2");
    assert!(
        err.to_string()
            .contains("token id 70000 in the chosen is outside the model's vocabulary of 64"),
        "{err}"
    );
    assert!(check_vocab(&pairs[..1], 0, 64).is_ok());
    let err = check_vocab(&pairs[..1], 64, 64).unwrap_err();
    assert!(err.to_string().contains("pad id 64"), "{err}");
}

#[test]
fn truncated_away_completions_are_bad_rows() {
    let tok = tokenizer();
    let loaded = load_file(&root().join("dpo/standard.jsonl"), None).unwrap();
    let (pairs, _) = tokenize_rows(&tok, &loaded.rows, TokenizeOptions::default());
    let (_, bad) = drop_truncated_away(pairs, Some(3), TruncationMode::KeepStart);
    assert!(bad[0].to_string().contains("standard.jsonl:1: completion truncated away: the prompt alone has 5 tokens and max_length is 3"), "{}", bad[0]);
    // The message says what to do.
    for remedy in [
        "raise `max_length`",
        "set `max_prompt_length`",
        "`on_bad_row = \"skip\"`",
        "prefer inspect",
    ] {
        assert!(bad[0].reason.contains(remedy), "{}", bad[0]);
    }
    let opts = TokenizeOptions {
        max_completion_length: Some(0),
        ..Default::default()
    };
    let (_, bad) = tokenize_rows(&tok, &loaded.rows, opts);
    assert!(
        bad[0]
            .to_string()
            .ends_with("standard.jsonl:1: a completion is empty after tokenisation and truncation")
    );
}

#[test]
fn train_eval_split_and_length_grouping_are_seeded_and_complete() {
    use prefer_dpo::data::{group_by_length, split_train_eval};
    let rows: Vec<usize> = (0..50).collect();
    let (train, eval) = split_train_eval(&rows, 0.2, 42);
    assert_eq!((train.len(), eval.len()), (40, 10));
    let mut all: Vec<usize> = train.iter().chain(&eval).copied().collect();
    all.sort();
    assert_eq!(all, rows);
    assert_eq!(
        split_train_eval(&rows, 0.2, 42),
        (train.clone(), eval.clone())
    );
    assert_ne!(split_train_eval(&rows, 0.2, 7).1, eval);

    let tok = tokenizer();
    let loaded = load_file(&root().join("dpo/sharegpt.json"), None).unwrap();
    let (pairs, _) = tokenize_rows(&tok, &loaded.rows, TokenizeOptions::default());
    let order = group_by_length(&pairs, 2, 50, 3);
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, (0..pairs.len()).collect::<Vec<_>>());
    // Within the single window, each batch of two holds neighbours in length order.
    let len = |i: usize| pairs[i].prompt.len() + pairs[i].chosen.len().max(pairs[i].rejected.len());
    let mut lens: Vec<usize> = (0..pairs.len()).map(len).collect();
    lens.sort();
    for b in order.chunks(2).filter(|b| b.len() == 2) {
        let (a, c) = (len(b[0]).min(len(b[1])), len(b[0]).max(len(b[1])));
        let pos = lens.iter().position(|&l| l == a).unwrap();
        assert!(
            lens[pos..].iter().take(2).any(|&l| l == c)
                || lens.iter().filter(|&&l| l == a).count() > 1
        );
    }
}

/// Parquet files written by `datasets` (as the Hub's are; `tools/make_parquet_fixtures.py`) give
/// the rows of their JSON Lines form, so TRL's token ids, in every row format and codec; bad rows
/// are located as `file: row N`.
#[test]
fn parquet_rows_are_their_json_lines_rows() {
    let tok = tokenizer();
    for (parquet, jsonl) in [
        ("standard.parquet", "standard.jsonl"),
        ("standard_zstd.parquet", "standard.jsonl"),
        ("conversational.parquet", "conversational.jsonl"),
        ("implicit.parquet", "implicit.jsonl"),
    ] {
        let path = root().join("dpo/parquet").join(parquet);
        let from_parquet = load_file(&path, None).unwrap();
        let from_json = load_file(&root().join("dpo").join(jsonl), None).unwrap();
        assert!(
            from_parquet.bad.is_empty(),
            "{parquet}: {:?}",
            from_parquet.bad
        );
        assert_eq!(from_parquet.format, from_json.format, "{parquet}");
        let rows = |l: &prefer_dpo::data::Loaded| -> Vec<_> {
            l.rows.iter().map(|(_, r)| r.clone()).collect()
        };
        assert_eq!(rows(&from_parquet), rows(&from_json), "{parquet}");
        assert!(
            from_parquet.rows[2]
                .0
                .ends_with(&format!("{parquet}: row 3")),
            "{}",
            from_parquet.rows[2].0
        );
        let ids = |l: &prefer_dpo::data::Loaded| -> Vec<_> {
            let (pairs, _) = tokenize_rows(&tok, &l.rows, TokenizeOptions::default());
            pairs
                .into_iter()
                .map(|p| (p.prompt, p.chosen, p.rejected))
                .collect()
        };
        assert_eq!(ids(&from_parquet), ids(&from_json), "{parquet}");
    }

    let bad = load_file(&root().join("dpo/parquet/bad_rows.parquet"), None).unwrap();
    let found: Vec<(String, String)> = bad
        .bad
        .iter()
        .map(|b| {
            (
                b.location.rsplit('/').next().unwrap().to_string(),
                b.reason.clone(),
            )
        })
        .collect();
    assert_eq!(
        found,
        [
            (
                "bad_rows.parquet: row 2".to_string(),
                "`chosen` is empty".to_string()
            ),
            (
                "bad_rows.parquet: row 4".to_string(),
                "`rejected` must be a string, found null".to_string()
            ),
        ]
    );
    assert_eq!(bad.rows.len(), 3);

    // Shards of one split read as one file; a file that is not Parquet says so.
    let shards: Vec<PathBuf> = ["00000", "00001"]
        .iter()
        .map(|i| root().join(format!("dpo/parquet/hub/data/train-{i}-of-00002.parquet")))
        .collect();
    let both = load_files(&shards, None).unwrap();
    let json = load_file(&root().join("dpo/conversational.jsonl"), None).unwrap();
    assert_eq!(both.rows.len(), 5);
    assert!(both.rows.iter().zip(&json.rows).all(|(a, b)| a.1 == b.1));
    let not_parquet =
        std::env::temp_dir().join(format!("prefer-not-{}.parquet", std::process::id()));
    std::fs::write(&not_parquet, b"{\"prompt\": \"a\"}\n").unwrap();
    let err = load_file(&not_parquet, None).unwrap_err();
    assert!(
        err.reason.starts_with("not a readable Parquet file"),
        "{err}"
    );
    std::fs::remove_file(&not_parquet).unwrap();
}

fn scratch_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("prefer-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Preference pairs under KTO: TRL's `KTOTrainer` splits the first four rows of `standard.jsonl`
/// into four desirable then four undesirable examples, and gives each the completion of its
/// batch neighbour as its KL completion; prefer's ids are TRL's, one by one.
#[test]
fn kto_examples_are_trls_with_their_kl_completions() {
    use prefer_dpo::data::{kto_pairs, load_examples, tokenize_examples};
    let standard = std::fs::read_to_string(root().join("dpo/standard.jsonl")).unwrap();
    let four: String = standard.lines().take(4).map(|l| format!("{l}\n")).collect();
    let path = scratch_file("kto-pairs.jsonl", &four);
    let loaded = load_examples(&[path], None)
        .unwrap()
        .check(OnBadRow::Error)
        .unwrap();
    let (examples, bad) = tokenize_examples(&tokenizer(), &loaded.rows, Default::default());
    assert!(bad.is_empty(), "{bad:?}");
    let (pairs, dropped) = kto_pairs(examples, Some(1024), TruncationMode::KeepStart, 8);
    assert!(dropped.is_empty());
    let f: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("dpo/losses.json")).unwrap())
            .unwrap();
    let want = f["other_trainers"]["kto"]["examples"].as_array().unwrap();
    assert_eq!(pairs.len(), want.len());
    for (i, (p, w)) in pairs.iter().zip(want).enumerate() {
        assert_eq!(p.label, w["label"].as_bool(), "example {i}");
        assert_eq!(p.prompt, ids(&w["prompt_ids"]), "example {i}");
        assert_eq!(p.chosen, ids(&w["completion_ids"]), "example {i}");
        assert_eq!(p.rejected, ids(&w["KL_completion_ids"]), "example {i}");
    }
    assert!(
        pairs[0].location.ends_with(":1 (chosen)"),
        "{}",
        pairs[0].location
    );
    assert!(
        pairs[4].location.ends_with(":1 (rejected)"),
        "{}",
        pairs[4].location
    );
}

/// Unpaired files: labels kept in order, conversational rows too; a bad label is a bad row with
/// its line; a split is either unpaired examples or pairs, never both; KL completions rotate
/// within each batch, the last (short) one included.
#[test]
fn unpaired_examples_rows_labels_and_kl_rotation() {
    use prefer_dpo::data::{kto_pairs, load_examples, tokenize_examples};
    let rows = concat!(
        "{\"prompt\": \"The sky is\", \"completion\": \" blue.\", \"label\": true}\n",
        "{\"prompt\": \"The sky is\", \"completion\": \" green.\", \"label\": false}\n",
        "{\"prompt\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"completion\": [{\"role\": \"assistant\", \"content\": \"Hello.\"}], \"label\": true}\n",
        "{\"prompt\": \"Water is\", \"completion\": \" wet.\", \"label\": \"yes\"}\n",
        "{\"prompt\": \"Water is\", \"completion\": \" dry.\"}\n",
        "{\"prompt\": \"Ice is\", \"completion\": \" cold.\", \"label\": true}\n",
        "{\"prompt\": \"Fire is\", \"completion\": \" hot.\", \"label\": true}\n",
    );
    let path = scratch_file("unpaired.jsonl", rows);
    let loaded = load_examples(std::slice::from_ref(&path), None).unwrap();
    let labels: Vec<bool> = loaded.rows.iter().map(|(_, r)| r.label).collect();
    assert_eq!(labels, [true, false, true, true, true]);
    let bad: Vec<String> = loaded.bad.iter().map(ToString::to_string).collect();
    let name = path.display();
    assert_eq!(
        bad,
        [
            format!("{name}:4: `label` must be true or false, found a string"),
            format!("{name}:5: missing field `label` (true: desirable, false: undesirable)"),
        ]
    );
    assert_eq!(
        loaded
            .clone()
            .check(OnBadRow::Error)
            .unwrap_err()
            .to_string(),
        bad[0]
    );

    let (examples, bad) = tokenize_examples(&tokenizer(), &loaded.rows, Default::default());
    assert!(bad.is_empty(), "{bad:?}");
    let completions: Vec<Vec<u32>> = examples.iter().map(|e| e.completion.clone()).collect();
    let (pairs, _) = kto_pairs(examples, None, TruncationMode::KeepStart, 3);
    // Batches [0 1 2] [3 4]: each example's KL completion is its predecessor's, the first's the last's.
    let kl: Vec<&Vec<u32>> = pairs.iter().map(|p| &p.rejected).collect();
    let c = &completions;
    assert_eq!(kl, [&c[2], &c[0], &c[1], &c[4], &c[3]]);

    let pairs_file = root().join("dpo/standard.jsonl");
    let err = load_examples(&[path, pairs_file], None).unwrap_err();
    assert!(
        err.to_string().contains("a split is all one or the other"),
        "{err}"
    );
}

/// Unpaired files, standard and conversational, give the ids of TRL's `KTOTrainer` dataset: the
/// prompt, the completion (the common-prefix rule, the chat template's end of turn) and the KL
/// completion of batches of 2 (a last batch of one takes its own).
#[test]
fn unpaired_files_give_trls_kto_token_ids() {
    use prefer_dpo::data::{kto_pairs, load_examples, tokenize_examples};
    for file in ["unpaired.jsonl", "unpaired_conversational.jsonl"] {
        let expected: Value = serde_json::from_str(
            &std::fs::read_to_string(root().join(format!("dpo/{file}.expected.json"))).unwrap(),
        )
        .unwrap();
        let loaded = load_examples(&[root().join("dpo").join(file)], None)
            .unwrap()
            .check(OnBadRow::Error)
            .unwrap();
        let (examples, bad) = tokenize_examples(&tokenizer(), &loaded.rows, Default::default());
        assert!(bad.is_empty(), "{file}: {bad:?}");
        let (pairs, _) = kto_pairs(examples, Some(1024), TruncationMode::KeepStart, 2);
        let want = expected["rows"].as_array().unwrap();
        assert_eq!(pairs.len(), want.len(), "{file}");
        for (i, (p, w)) in pairs.iter().zip(want).enumerate() {
            assert_eq!(p.label, w["label"].as_bool(), "{file} row {i}");
            assert_eq!(p.prompt, ids(&w["prompt_ids"]), "{file} row {i}: prompt");
            assert_eq!(
                p.chosen,
                ids(&w["completion_ids"]),
                "{file} row {i}: completion"
            );
            assert_eq!(
                p.rejected,
                ids(&w["KL_completion_ids"]),
                "{file} row {i}: KL"
            );
        }
    }
}
