#!/usr/bin/env python3
"""Write the Parquet test fixtures from the committed JSON Lines fixtures, with Hugging Face
`datasets` (the writer behind the Hub's Parquet files), so the Rust readers can be checked to give
the same rows — and so TRL's token ids in `<file>.expected.json` — from either form.

Run by hand from the repository root:  /root/venv/bin/python tools/make_parquet_fixtures.py
Needs `datasets` (pip install -r ../shared/bench/requirements.txt). Deterministic: the rows come
from the committed files.

What it makes
-------------
tests/fixtures/dpo/parquet/
  standard.parquet        tests/fixtures/dpo/standard.jsonl (strings)
  conversational.parquet  conversational.jsonl (list<struct<content, role>> columns, one prompt
                          with a system message, so list lengths differ)
  implicit.parquet        implicit.jsonl (whole conversations in chosen/rejected)
  standard_zstd.parquet   standard.jsonl compressed with zstd (the others: snappy, the default)
  bad_rows.parquet        standard rows whose 2nd has an empty `chosen` and 4th a null `rejected`
  hub/data/train-00000-of-00002.parquet, train-00001-of-00002.parquet
                          conversational.jsonl rows 0-2 and 3-4: a split in two shards, as
                          `push_to_hub` names them, with an extra `score_chosen` column
  hub/data/test-00000-of-00001.parquet   standard.jsonl rows 0-1 in conversational form
"""

import json
from pathlib import Path

import pyarrow.parquet as pq
from datasets import Dataset

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "tests" / "fixtures" / "dpo"
OUT = SRC / "parquet"


def rows(name):
    return [json.loads(line) for line in (SRC / name).read_text().splitlines() if line.strip()]


def write(rows_, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows_).to_parquet(str(path))
    print("wrote", path.relative_to(ROOT), len(rows_), "rows")


def main():
    for name in ["standard", "conversational", "implicit"]:
        write(rows(f"{name}.jsonl"), OUT / f"{name}.parquet")
    pq.write_table(
        Dataset.from_list(rows("standard.jsonl")).data.table,
        OUT / "standard_zstd.parquet",
        compression="zstd",
    )

    bad = rows("standard.jsonl")
    bad[1]["chosen"] = ""
    bad[3]["rejected"] = None
    write(bad, OUT / "bad_rows.parquet")

    conv = rows("conversational.jsonl")
    for i, r in enumerate(conv):
        r["score_chosen"] = float(8 - i)
    write(conv[:3], OUT / "hub" / "data" / "train-00000-of-00002.parquet")
    write(conv[3:], OUT / "hub" / "data" / "train-00001-of-00002.parquet")
    test = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
            "score_chosen": 5.0,
        }
        for r in rows("standard.jsonl")[:2]
    ]
    write(test, OUT / "hub" / "data" / "test-00000-of-00001.parquet")


if __name__ == "__main__":
    main()
