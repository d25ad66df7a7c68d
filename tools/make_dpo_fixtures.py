#!/usr/bin/env python3
"""Generate the DPO (preference optimisation) test fixtures under tests/fixtures/dpo/.

Run by hand from the repository root:  python3 tools/make_dpo_fixtures.py
Everything is seeded and computed in float32 on CPU with deterministic algorithms, so re-running
reproduces the same files.  All numbers come from TRL's own code paths (DPOTrainer dataset
preparation, DataCollatorForPreference, DPOTrainer.compute_loss, CPOTrainer/ORPOTrainer
get_batch_loss_metrics, KTOTrainer.compute_loss), not from a re-implementation.

What it makes
-------------
tests/fixtures/dpo/
  standard.jsonl          {"prompt","chosen","rejected"} plain strings (5 rows; row 4 has a prompt
                          ending in a space, which BPE merges into the completion, and a rejected
                          that already ends in the EOS text)
  standard_array.json     a JSON array of standard rows (4 rows)
  conversational.jsonl    prompt = list of messages (optional system, one multi-turn prompt),
                          chosen/rejected = [one assistant message] (5 rows)
  implicit.jsonl          {"chosen","rejected"} whole conversations sharing the prompt prefix (4 rows)
  sharegpt.json           LLaMA-Factory ShareGPT preference format (5 rows; rows 0-1 verbatim from
                          llamafactory 0.9.5 sdist data/dpo_en_demo.json, indices 134 and 269; the
                          others are short hand-written rows, some with "system", one multi-turn)
  <file>.expected.json    per row: what DPOTrainer(...).train_dataset holds ("prompt_ids",
                          "chosen_ids", "rejected_ids"), the text TRL feeds the tokenizer
                          ("rendered"), plus "truncated" / "truncated_keep_end": the same data with
                          max_length set, showing which rows the trainer drops and what the
                          collator (where 1.16 truncates) produces for each row.
  adapter/                PEFT LoRA adapter (r=4, alpha=8, dropout 0, q,k,v,o,gate,up,down) on
                          tests/fixtures/llama/gqa_f32, lora_A / lora_B = seeded N(0,1) * 0.05
                          (adapter_config.json + adapter_model.safetensors, PEFT save_pretrained)
  losses.json             batch = first 4 rows of standard.jsonl, layout [chosen x4; rejected x4]:
                          the collated batch, per-pair log-prob sums (policy = base+adapter,
                          reference = base with the adapter disabled), token counts, mean logits,
                          loss + logged metrics for every DPO loss_type (label_smoothing 0.1 and 0.0),
                          the multi-loss ["sigmoid","sft"] with weights [1.0,0.5], ld_alpha,
                          use_weighting and f_divergence_type variants, CPOTrainer (sigmoid/CPO, SimPO), ORPOTrainer and
                          KTOTrainer on the same data.
  sigmoid_grads.safetensors  d(sigmoid loss, beta 0.1, no label smoothing)/d(every LoRA parameter),
                          keys as in adapter_model.safetensors (lora_A [r,in], lora_B [out,r]).
  {cpo,simpo,cpo_simpo,orpo}_grads.safetensors
                          the same for the CPOTrainer / ORPOTrainer runs of losses.json's
                          "other_trainers" (their "grads" field names the file): d(loss)/d(every
                          LoRA parameter), loss as get_batch_loss_metrics(model, batch, "train")
                          computes it on the same batch and adapter; same keys, shapes and float32.
  unpaired.jsonl, unpaired_conversational.jsonl
                          KTO's unpaired rows {"prompt","completion","label"}, standard (row 2 has
                          the trailing-space prompt) and conversational (a system message, a
                          multi-turn prompt); <file>.expected.json: KTOTrainer's train_dataset ids
                          per row (prompt, completion, KL completion with batch size 2), in order.
  kto_grads.safetensors   the same for KTOTrainer.compute_loss on the 8 examples (4 desirable, 4
                          undesirable) TRL makes of those 4 rows, in one batch of 8.
  kto_apo_zero_unpaired_grads.safetensors
                          the same with KTOConfig(loss_type="apo_zero_unpaired").

Versions used to generate the committed files:
  python 3.11.7, torch 2.15.0, transformers 5.23.0, trl 1.16.0, peft 0.21.2, accelerate 1.15.0,
  datasets 5.2.0, tokenizers 0.23.3, safetensors 0.8.0, numpy 2.4.6; kto_grads.safetensors and
  losses.json last with accelerate 1.16.0 (losses.json came out identical but for the KTO keys
  added; the other gradient files differed by at most 7e-7 and were kept).
"""

import copy
import importlib.metadata
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import datasets
import peft
import safetensors.torch as st
import transformers
import trl
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from trl.data_utils import apply_chat_template, extract_prompt, is_conversational
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "dpo"
MODEL_REL = "tests/fixtures/llama/gqa_f32"  # relative, so adapter_config.json stays portable
ADAPTER_DIR = OUT / "adapter"
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LOSS_TYPES = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]
# Loss types whose formula reads label_smoothing in TRL 1.16 (dpo_trainer.py _compute_loss).
USES_LABEL_SMOOTHING = ["exo_pair", "robust", "aot", "aot_unpaired"]

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
datasets.disable_progress_bars()
datasets.disable_caching()
warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
logging.getLogger("trl").setLevel(logging.ERROR)
os.environ.setdefault("TQDM_DISABLE", "1")

TMP = tempfile.mkdtemp(prefix="dpo_fixtures_")

# --------------------------------------------------------------------------- data
STANDARD = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "Two plus two is", "chosen": " four.", "rejected": " five."},
    {"prompt": "Water is", "chosen": " wet and clear.", "rejected": " dry."},
    {"prompt": "Cats like to", "chosen": " nap in the sun.", "rejected": " bark at cars."},
    # trailing space in the prompt: tokenized alone it ends in a lone " " token, but in
    # prompt+completion the space merges into " b" / " s" -> TRL's common-prefix rule moves the
    # split one token left.  The rejected text already ends in the EOS text, so TRL does not
    # append a second one.
    {"prompt": "Q: Sky color?\nA: ", "chosen": "blue.", "rejected": "sea.<|im_end|>"},
]

STANDARD_ARRAY = [
    {"prompt": "Ice is", "chosen": " cold.", "rejected": " hot."},
    {"prompt": "The sun rises in the", "chosen": " east.", "rejected": " west."},
    {"prompt": "A week has", "chosen": " seven days.", "rejected": " ten days."},
    {"prompt": "Dogs can", "chosen": " run.", "rejected": " fly."},
]


def msg(role, content):
    return {"role": role, "content": content}


CONVERSATIONAL = [
    {"prompt": [msg("user", "Hi!")], "chosen": [msg("assistant", "Hello.")],
     "rejected": [msg("assistant", "Go away.")]},
    {"prompt": [msg("system", "Be brief."), msg("user", "Sky color?")],
     "chosen": [msg("assistant", "Blue.")], "rejected": [msg("assistant", "It depends.")]},
    {"prompt": [msg("user", "2+2?")], "chosen": [msg("assistant", "4")],
     "rejected": [msg("assistant", "5")]},
    {"prompt": [msg("user", "Hi"), msg("assistant", "Hello."), msg("user", "Name?")],
     "chosen": [msg("assistant", "Ada.")], "rejected": [msg("assistant", "No.")]},
    {"prompt": [msg("system", "You are kind."), msg("user", "Help?")],
     "chosen": [msg("assistant", "Sure.")], "rejected": [msg("assistant", "No.")]},
]

IMPLICIT = [
    {"chosen": [msg("user", "Ice is?"), msg("assistant", "Cold.")],
     "rejected": [msg("user", "Ice is?"), msg("assistant", "Hot.")]},
    {"chosen": [msg("system", "Be brief."), msg("user", "Best pet?"), msg("assistant", "A cat.")],
     "rejected": [msg("system", "Be brief."), msg("user", "Best pet?"), msg("assistant", "A rock.")]},
    {"chosen": [msg("user", "Hi"), msg("assistant", "Hello."), msg("user", "Bye"),
                msg("assistant", "Bye!")],
     "rejected": [msg("user", "Hi"), msg("assistant", "Hello."), msg("user", "Bye"),
                  msg("assistant", "What?")]},
    {"chosen": [msg("user", "1+1?"), msg("assistant", "2")],
     "rejected": [msg("user", "1+1?"), msg("assistant", "3")]},
]

# Rows 0 and 1: verbatim from llamafactory-0.9.5.tar.gz data/dpo_en_demo.json (indices 134, 269).
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Obtain the result by calculating 6778576-84834150134. Only respond with math and no words."}],
     "chosen": {"from": "gpt", "value": "6778576 - 84834150134 = -84827371558"},
     "rejected": {"from": "gpt", "value": "84834150134 - 6778576 = -16666579378"}},
    {"conversations": [{"from": "human", "value": "Convert this hexadecimal number into binary number.\nB3A9"}],
     "chosen": {"from": "gpt", "value": "The hexadecimal number B3A9 is equivalent to the binary number 1011001110101101."},
     "rejected": {"from": "gpt", "value": "Hello! I'd be happy to help you with that. The hexadecimal number B3A9 can be converted into a binary number as follows:\n\nB3A9 = 1011101011\n\nI hope that helps! Let me know if you have any other questions."}},
    {"conversations": [{"from": "human", "value": "Hi!"}],
     "chosen": {"from": "gpt", "value": "Hello."}, "rejected": {"from": "gpt", "value": "Bye."},
     "system": "Be nice."},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
                       {"from": "human", "value": "Age?"}],
     "chosen": {"from": "gpt", "value": "Ten."}, "rejected": {"from": "gpt", "value": "No."}},
    {"conversations": [{"from": "human", "value": "Red?"}],
     "chosen": {"from": "gpt", "value": "A color."}, "rejected": {"from": "gpt", "value": "A fish."},
     "system": "Be brief."},
]

SHAREGPT_ROLE = {"system": "system", "human": "user", "gpt": "assistant"}


def sharegpt_to_trl(row):
    """LLaMA-Factory ShareGPT preference row -> TRL conversational preference row."""
    prompt = []
    if row.get("system"):
        prompt.append(msg("system", row["system"]))
    for m in row["conversations"]:
        prompt.append(msg(SHAREGPT_ROLE[m["from"]], m["value"]))
    return {
        "prompt": prompt,
        "chosen": [msg(SHAREGPT_ROLE[row["chosen"]["from"]], row["chosen"]["value"])],
        "rejected": [msg(SHAREGPT_ROLE[row["rejected"]["from"]], row["rejected"]["value"])],
    }


# (file name, writer kind, rows as stored, rows as given to TRL, truncation max_length)
DATA_FILES = [
    ("standard.jsonl", "jsonl", STANDARD, STANDARD, 10),
    ("standard_array.json", "array", STANDARD_ARRAY, STANDARD_ARRAY, 7),
    ("conversational.jsonl", "jsonl", CONVERSATIONAL, CONVERSATIONAL, 24),
    ("implicit.jsonl", "jsonl", IMPLICIT, IMPLICIT, 28),
    ("sharegpt.json", "array", SHAREGPT, [sharegpt_to_trl(r) for r in SHAREGPT], 40),
]


# --------------------------------------------------------------------------- helpers
def f32s(a):
    return [float(str(np.float32(v))) for v in np.asarray(a, dtype=np.float32).reshape(-1)]


def f32(v):
    return float(str(np.float32(v)))


def dump(path, obj, indent=None):
    with open(path, "w", encoding="utf-8") as f:
        if indent is None:
            json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        else:
            json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")


def write_data(path, kind, rows):
    with open(path, "w", encoding="utf-8") as f:
        if kind == "jsonl":
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        else:
            json.dump(rows, f, ensure_ascii=False, indent=1)
            f.write("\n")


def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_REL)


def base_model():
    m = AutoModelForCausalLM.from_pretrained(MODEL_REL, dtype=torch.float32)
    m.eval()
    return m


def lora_config():
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", target_modules=ALL_PROJ,
                      task_type="CAUSAL_LM")


COMMON_ARGS = dict(report_to="none", bf16=False, fp16=False, use_cpu=True,
                   gradient_checkpointing=False, seed=0, logging_steps=1)


def dpo_args(**kw):
    kw.setdefault("per_device_train_batch_size", 4)
    return DPOConfig(output_dir=os.path.join(TMP, "dpo"), **COMMON_ARGS, **kw)


def chunk_list(t):
    return [[int(x) for x in row] for row in t.tolist()]


# --------------------------------------------------------------------------- part 1: data files
def dpo_prepare(rows, **cfg):
    """Run DPOTrainer's own dataset preparation; return (trainer, prepared rows)."""
    tok = tokenizer()
    # ref_model given so the trainer does not load a second copy from disk; it is unused here.
    tr = DPOTrainer(model=base_model(), ref_model=base_model(), args=dpo_args(**cfg),
                    train_dataset=Dataset.from_list(copy.deepcopy(rows)), processing_class=tok)
    return tr, [tr.train_dataset[i] for i in range(len(tr.train_dataset))]


def rendered_text(row, tok):
    """The text TRL 1.16 feeds the tokenizer for one (already prompt-extracted) row."""
    if is_conversational(row):
        out = {
            "prompt": tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True),
            "prompt_chosen": tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False),
            "prompt_rejected": tok.apply_chat_template(row["prompt"] + row["rejected"], tokenize=False),
        }
        # trl.apply_chat_template (maybe_apply_chat_template) = the older text-level split, still
        # used by CPOTrainer/ORPOTrainer: prompt text = common character prefix of the renders.
        split = apply_chat_template({k: row[k] for k in ("prompt", "chosen", "rejected")}, tok)
        out["trl_apply_chat_template"] = {k: split[k] for k in ("prompt", "chosen", "rejected")}
        # tokenize=True must equal tokenizing the rendered text without special tokens (no BOS)
        for k in ("prompt", "prompt_chosen", "prompt_rejected"):
            msgs = row["prompt"] + (row["chosen"] if k == "prompt_chosen" else
                                    row["rejected"] if k == "prompt_rejected" else [])
            ids_t = tok.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                            add_generation_prompt=(k == "prompt"))["input_ids"]
            assert ids_t == tok(out[k], add_special_tokens=False)["input_ids"] == tok(out[k])["input_ids"]
        return out
    eos = tok.eos_token
    c = row["chosen"] if row["chosen"].endswith(eos) else row["chosen"] + eos
    r = row["rejected"] if row["rejected"].endswith(eos) else row["rejected"] + eos
    return {"prompt": row["prompt"], "prompt_chosen": row["prompt"] + c, "prompt_rejected": row["prompt"] + r}


def collated_row(trainer, prepared_row):
    b = trainer.data_collator([prepared_row])
    n = int(b["attention_mask"].sum(1)[0]), int(b["attention_mask"].sum(1)[1])
    return {
        "chosen_input_ids": chunk_list(b["input_ids"][:1, : n[0]])[0],
        "chosen_completion_mask": chunk_list(b["completion_mask"][:1, : n[0]])[0],
        "rejected_input_ids": chunk_list(b["input_ids"][1:, : n[1]])[0],
        "rejected_completion_mask": chunk_list(b["completion_mask"][1:, : n[1]])[0],
    }


def make_data_fixtures():
    summary = {}
    for name, kind, stored, trl_rows, max_len in DATA_FILES:
        write_data(OUT / name, kind, stored)
        tok = tokenizer()
        tr, prepared = dpo_prepare(trl_rows, max_length=None)
        assert len(prepared) == len(trl_rows)
        rows = []
        for i, (src, p) in enumerate(zip(trl_rows, prepared)):
            ex = extract_prompt(src) if "prompt" not in src else src
            rend = rendered_text(ex, tok)
            if is_conversational(ex):
                prompt_alone = tok.apply_chat_template(ex["prompt"], tokenize=True, return_dict=True,
                                                       add_generation_prompt=True)["input_ids"]
            else:
                prompt_alone = tok(ex["prompt"])["input_ids"]
            full_c = p["prompt_ids"] + p["chosen_ids"]
            full_r = p["prompt_ids"] + p["rejected_ids"]
            assert full_c == tok(rend["prompt_chosen"])["input_ids"]
            assert full_r == tok(rend["prompt_rejected"])["input_ids"]
            entry = {
                "prompt_ids": p["prompt_ids"],
                "chosen_ids": p["chosen_ids"],
                "rejected_ids": p["rejected_ids"],
                "prompt_ids_alone": prompt_alone,
                "prompt_tokens_dropped": len(prompt_alone) - len(p["prompt_ids"]),
                "rendered": rend,
            }
            if "prompt" not in src:
                entry["extracted"] = {k: ex[k] for k in ("prompt", "chosen", "rejected")}
            if name == "sharegpt.json":
                entry["trl_row"] = src
            rows.append(entry)
        out = {
            "trl_version": trl.__version__,
            "model": MODEL_REL,
            "config": {"max_length": None, "truncation_mode": "keep_start"},
            "fields": "prompt_ids/chosen_ids/rejected_ids = DPOTrainer(...).train_dataset columns "
                      "(TRL 1.16 names); the collator feeds prompt_ids+chosen_ids and "
                      "prompt_ids+rejected_ids with completion_mask 1 on the completion part",
            "rows": rows,
        }
        for mode in ("keep_start", "keep_end"):
            trt, prep_t = dpo_prepare(trl_rows, max_length=max_len, truncation_mode=mode)
            kept_prompts = [r["prompt_ids"] for r in prep_t]
            # map kept rows back to source indices (rows are kept in order)
            kept_idx, j = [], 0
            for i, r in enumerate(rows):
                if j < len(prep_t) and prep_t[j]["prompt_ids"] == r["prompt_ids"] and \
                        prep_t[j]["chosen_ids"] == r["chosen_ids"]:
                    kept_idx.append(i)
                    j += 1
            assert j == len(prep_t)
            trows = []
            for i, p in zip(kept_idx, prep_t):
                assert p["prompt_ids"] == rows[i]["prompt_ids"]  # dataset ids are never truncated
                trows.append({"source_row": i, **collated_row(trt, p)})
            key = "truncated" if mode == "keep_start" else "truncated_keep_end"
            out[key] = {
                "settings": {"max_length": max_len, "truncation_mode": mode},
                "rule": ("rows with len(prompt_ids) >= max_length are dropped by the trainer; the collator "
                         "then cuts each prompt+completion sequence to its first max_length tokens"
                         if mode == "keep_start" else
                         "no rows dropped; the collator keeps the LAST max_length tokens of each "
                         "prompt+completion sequence (deprecated mode)"),
                "kept_rows": kept_idx,
                "dropped_rows": [i for i in range(len(rows)) if i not in kept_idx],
                "rows": trows,
            }
            del kept_prompts
        dump(OUT / (name + ".expected.json"), out)
        lens = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
        summary[name] = {"max_seq_len": max(lens), "trunc_kept": out["truncated"]["kept_rows"]}
    return summary


# --------------------------------------------------------------------------- part 2: adapter
def make_adapter():
    base = base_model()
    pm = get_peft_model(base, lora_config())
    g = torch.Generator().manual_seed(20250101)
    with torch.no_grad():
        for n, p in sorted(pm.named_parameters()):
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.05)
    if ADAPTER_DIR.exists():
        shutil.rmtree(ADAPTER_DIR)
    pm.save_pretrained(str(ADAPTER_DIR))
    for f in ADAPTER_DIR.iterdir():
        f.chmod(0o644)
    # PEFT stores target_modules as a set: sort it so the file does not depend on PYTHONHASHSEED
    cfg_path = ADAPTER_DIR / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    readme = ADAPTER_DIR / "README.md"
    if readme.exists():
        readme.unlink()
    return st.load_file(str(ADAPTER_DIR / "adapter_model.safetensors"))


def load_adapter_into(model, adapter_sd):
    res = set_peft_model_state_dict(model, adapter_sd)
    assert not res.unexpected_keys, res.unexpected_keys
    n = 0
    for name, p in model.named_parameters():
        if "lora_" in name and ".default." in name:
            key = name.replace(".default.", ".")
            assert torch.equal(p.detach(), adapter_sd[key]), key
            n += 1
    assert n == len(adapter_sd), (n, len(adapter_sd))


# --------------------------------------------------------------------------- part 2: DPO losses
def dpo_loss_trainer(rows, adapter_sd, **cfg):
    tok = tokenizer()
    tr = DPOTrainer(model=base_model(), args=dpo_args(**cfg), train_dataset=Dataset.from_list(copy.deepcopy(rows)),
                    processing_class=tok, peft_config=lora_config())
    assert tr.ref_model is None and "ref" not in tr.model.peft_config
    load_adapter_into(tr.model, adapter_sd)
    tr.model.train()
    return tr


def batch_of(tr, n):
    return tr.data_collator([tr.train_dataset[i] for i in range(n)])


def lora_grads(model):
    """d/d(every LoRA parameter) after backward, keyed as in adapter_model.safetensors."""
    grads = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            grads[name.replace(".default.", ".")] = p.grad.detach().clone().contiguous()
    return grads


def global_norm(grads):
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))


def run_dpo(rows, adapter_sd, n=4, backward=False, **cfg):
    tr = dpo_loss_trainer(rows, adapter_sd, **cfg)
    batch = batch_of(tr, n)
    tr.model.zero_grad(set_to_none=True)
    loss = tr.compute_loss(tr.model, batch)
    metrics = {k: float(v[-1]) for k, v in sorted(tr._metrics["train"].items())}
    grads = None
    if backward:
        loss.backward()
        grads = lora_grads(tr.model)
    return tr, batch, float(loss.detach()), metrics, grads


def per_pair_values(tr, batch):
    """Per-sequence log-prob sums etc. via TRL's fused head, cross-checked against plain logits."""
    ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    labels = ids.masked_fill(cm == 0, -100)
    shift = cm[:, 1:].to(torch.float32)
    model = tr.model
    with torch.no_grad():
        pol = model(input_ids=ids, attention_mask=am, labels=labels, fused_lm_head=True, use_cache=False)
        with model.disable_adapter():
            ref = model(input_ids=ids, attention_mask=am, labels=labels, fused_lm_head=True, use_cache=False)
        logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits.float()
        with model.disable_adapter():
            ref_logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits.float()
    # cross-check the fused head against log_softmax(logits)
    for fused, lg in ((pol, logits), (ref, ref_logits)):
        lp = torch.log_softmax(lg[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0] * shift
        assert torch.allclose(lp, fused.log_probs, atol=2e-5), (lp - fused.log_probs).abs().max()
        ml = lg[:, :-1].mean(-1) * shift
        assert torch.allclose(ml, fused.mean_logits, atol=2e-5)
    B = ids.shape[0] // 2
    counts = shift.sum(1)
    pol_sum, ref_sum = pol.log_probs.sum(1), ref.log_probs.sum(1)
    mean_logits = (pol.mean_logits * shift).sum(1) / counts
    ptok = []
    for i in range(2 * B):
        m = shift[i].bool()
        ptok.append(f32s(pol.log_probs[i][m]))
    return {
        "policy_chosen_logps": f32s(pol_sum[:B]),
        "policy_rejected_logps": f32s(pol_sum[B:]),
        "reference_chosen_logps": f32s(ref_sum[:B]),
        "reference_rejected_logps": f32s(ref_sum[B:]),
        "chosen_token_counts": [int(x) for x in counts[:B]],
        "rejected_token_counts": [int(x) for x in counts[B:]],
        "chosen_mean_logits": f32s(mean_logits[:B]),
        "rejected_mean_logits": f32s(mean_logits[B:]),
        "policy_chosen_token_logps": ptok[:B],
        "policy_rejected_token_logps": ptok[B:],
        "chosen_logratios": f32s((pol_sum - ref_sum)[:B]),
        "rejected_logratios": f32s((pol_sum - ref_sum)[B:]),
    }


def make_dpo_losses(adapter_sd):
    rows = STANDARD[:4]
    res = {"trl_version": trl.__version__, "data": "first 4 rows of standard.jsonl",
           "model": MODEL_REL, "adapter": "adapter/", "dtype": "float32"}

    tr, batch, loss, metrics, grads = run_dpo(rows, adapter_sd, backward=True, loss_type="sigmoid",
                                              beta=0.1, label_smoothing=0.0)
    res["batch"] = {
        "layout": "rows 0..3 = prompt+chosen of pairs 0..3, rows 4..7 = prompt+rejected; right-padded "
                  "with pad id %d" % tr._tokenizer.pad_token_id,
        "input_ids": chunk_list(batch["input_ids"]),
        "attention_mask": chunk_list(batch["attention_mask"]),
        "completion_mask": chunk_list(batch["completion_mask"]),
    }
    pp = per_pair_values(tr, batch)
    res["per_pair"] = pp
    # one metadata key only: safetensors writes the metadata map in hash order
    st.save_file(grads, str(OUT / "sigmoid_grads.safetensors"), metadata={
        "description": "d/dLoRA of TRL %s DPO sigmoid loss (beta=0.1, label_smoothing=0.0) on the first "
                       "4 rows of standard.jsonl; loss=%r" % (trl.__version__, loss)})
    assert set(grads) == set(adapter_sd)
    res["sigmoid_grads"] = {"file": "sigmoid_grads.safetensors", "loss": f32(loss),
                            "global_norm": f32(global_norm(grads))}

    # independent check of the sigmoid loss value and one gradient from plain formulas
    h = (np.array(pp["chosen_logratios"], np.float64) - np.array(pp["rejected_logratios"], np.float64))
    plain = float(np.mean(np.logaddexp(0.0, -0.1 * h)))
    assert abs(plain - loss) < 1e-5, (plain, loss)

    # independent gradient check: plain HF forward + log_softmax on a fresh PEFT model
    pm = peft_policy(adapter_sd)
    ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    shift = cm[:, 1:].float()

    def seq_logps(model):
        lg = model(input_ids=ids, attention_mask=am, use_cache=False).logits.float()
        return (torch.log_softmax(lg[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0] * shift).sum(1)

    with torch.no_grad(), pm.disable_adapter():
        ref = seq_logps(pm)
    lr = seq_logps(pm) - ref
    plain_loss = -F.logsigmoid(0.1 * (lr[:4] - lr[4:])).mean()
    plain_loss.backward()
    for name, p in pm.named_parameters():
        if "lora_" in name:
            g = grads[name.replace(".default.", ".")]
            assert torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4), (name, (p.grad - g).abs().max())

    by = {}
    for ls in (0.1, 0.0):
        d = {}
        for lt in LOSS_TYPES:
            if lt == "exo_pair" and ls == 0.0:
                d[lt] = {"error": "ValueError: exo_pair requires label_smoothing > 0"}
                continue
            _, _, l, m, _ = run_dpo(rows, adapter_sd, loss_type=[lt], beta=0.1, label_smoothing=ls)
            d[lt] = {"loss": f32(l), "metrics": m}
        by["label_smoothing_%s" % ls] = d
    res["losses"] = {"beta": 0.1, **by}

    # the DPO paper's conservative (label-smoothed) sigmoid loss, which TRL 1.16 does NOT apply
    eps, b = 0.1, 0.1
    cons = float(np.mean(-(1 - eps) * -np.logaddexp(0.0, -b * h) - eps * -np.logaddexp(0.0, b * h)))
    res["sigmoid_label_smoothing_check"] = {
        "trl_sigmoid_ls0.1": by["label_smoothing_0.1"]["sigmoid"]["loss"],
        "trl_sigmoid_ls0.0": by["label_smoothing_0.0"]["sigmoid"]["loss"],
        "paper_conservative_ls0.1": f32(cons),
        "note": "TRL 1.16 'sigmoid' is -logsigmoid(beta*h) and ignores label_smoothing; the conservative "
                "form -(1-e)logsig(beta*h) - e*logsig(-beta*h) differs",
    }

    _, _, l, m, _ = run_dpo(rows, adapter_sd, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
                            beta=0.1, label_smoothing=0.0)
    res["multi_loss"] = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "beta": 0.1,
                         "loss": f32(l), "metrics": m,
                         "check": "loss = 1.0*sigmoid + 0.5*sft (sft = -mean of chosen completion token logps)"}
    sft = by["label_smoothing_0.0"]["sft"]["loss"]
    sig = by["label_smoothing_0.0"]["sigmoid"]["loss"]
    assert abs(l - (sig + 0.5 * sft)) < 1e-5

    extras = {}
    for nm, cfg in [("sigmoid_ld_alpha_0.5", dict(ld_alpha=0.5)),
                    ("sigmoid_use_weighting", dict(use_weighting=True)),
                    ("sigmoid_beta_0.5", dict(beta=0.5)),
                    # LD-DPO with SFT: the SFT term keeps the plain per-token mean
                    ("sigmoid_sft_ld_alpha_0.3", dict(ld_alpha=0.3, loss_type=["sigmoid", "sft"])),
                    # f-DPO: the log-ratios go through f'(exp(.)) before the loss
                    ("sigmoid_forward_kl", dict(f_divergence_type="forward_kl")),
                    ("sigmoid_js_divergence", dict(f_divergence_type="js_divergence")),
                    ("sigmoid_alpha_divergence_0.5", dict(f_divergence_type="alpha_divergence")),
                    ("hinge_alpha_divergence_0.3", dict(f_divergence_type="alpha_divergence",
                                                        f_alpha_divergence_coef=0.3, loss_type=["hinge"])),
                    ("ipo_js_divergence", dict(f_divergence_type="js_divergence", loss_type=["ipo"])),
                    ("sigmoid_norm_forward_kl", dict(f_divergence_type="forward_kl", loss_type=["sigmoid_norm"])),
                    ("robust_js_divergence", dict(f_divergence_type="js_divergence", loss_type=["robust"],
                                                  label_smoothing=0.1))]:
        cfg.setdefault("beta", 0.1)
        cfg.setdefault("loss_type", ["sigmoid"])
        cfg.setdefault("label_smoothing", 0.0)
        _, _, l, m, _ = run_dpo(rows, adapter_sd, **cfg)
        extras[nm] = {"config": cfg, "loss": f32(l), "metrics": m}
    res["extras"] = extras

    # Passing an already-wrapped PeftModel (with ref_model=None) instead of peft_config: TRL 1.16
    # adds a frozen copy of the adapter named "ref" and uses it as the reference.
    tok = tokenizer()
    pm = PeftModel.from_pretrained(base_model(), str(ADAPTER_DIR), is_trainable=True)
    tr2 = DPOTrainer(model=pm, args=dpo_args(loss_type="sigmoid"), train_dataset=Dataset.from_list(copy.deepcopy(rows)),
                     processing_class=tok)
    tr2.model.train()
    l2 = float(tr2.compute_loss(tr2.model, batch_of(tr2, 4)).detach())
    res["peft_model_passed_directly"] = {
        "ref_adapter_added": "ref" in tr2.model.peft_config,
        "loss": f32(l2),
        "metrics": {k: float(v[-1]) for k, v in sorted(tr2._metrics["train"].items())},
        "note": "reference = copy of the loaded adapter ('ref'), so all log-ratios are 0 and loss = ln 2",
    }
    return res


# --------------------------------------------------------------------------- CPO / SimPO / ORPO / KTO
def peft_policy(adapter_sd):
    pm = PeftModel.from_pretrained(base_model(), str(ADAPTER_DIR), is_trainable=True)
    load_adapter_into(pm, adapter_sd)
    return pm


def run_pairwise_trainer(cls, cfg_cls, adapter_sd, rows, backward=False, **cfg):
    tok = tokenizer()
    args = cfg_cls(output_dir=os.path.join(TMP, cls.__name__), per_device_train_batch_size=4,
                   **COMMON_ARGS, **cfg)
    tr = cls(model=peft_policy(adapter_sd), args=args, train_dataset=Dataset.from_list(copy.deepcopy(rows)),
             processing_class=tok)
    tr.model.train()
    feats = [tr.train_dataset[i] for i in range(len(rows))]
    batch = tr.data_collator(feats)
    with torch.no_grad():
        loss, metrics = tr.get_batch_loss_metrics(tr.model, batch, train_eval="train")
    grads = None
    if backward:
        # the same computation again, with autograd, for d(loss)/d(LoRA)
        tr.model.zero_grad(set_to_none=True)
        gloss, _ = tr.get_batch_loss_metrics(tr.model, batch, train_eval="train")
        assert float(gloss.detach()) == float(loss), (float(gloss), float(loss))
        gloss.backward()
        grads = lora_grads(tr.model)
        assert set(grads) == set(adapter_sd)
    ids = [{"chosen_input_ids": f["chosen_input_ids"], "rejected_input_ids": f["rejected_input_ids"],
            "prompt_len": len([x for x in f["chosen_labels"] if x == -100])} for f in feats]
    return tr, batch, float(loss), {k: float(v) for k, v in sorted(metrics.items())}, ids, grads


def make_other_trainers(adapter_sd, dpo_res):
    rows = STANDARD[:4]
    out = {}
    dpo_rows = dpo_res["batch"]["input_ids"]
    # DPO's unpadded sequences, to check the other trainers tokenize identically
    dpo_seqs = [[t for t, a in zip(r, m) if a] for r, m in zip(dpo_rows, dpo_res["batch"]["attention_mask"])]

    runs = [
        ("cpo", CPOTrainer, CPOConfig, dict(loss_type="sigmoid", beta=0.1)),
        ("simpo", CPOTrainer, CPOConfig, dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0)),
        ("cpo_simpo", CPOTrainer, CPOConfig, dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=1.0)),
        ("orpo", ORPOTrainer, ORPOConfig, dict(beta=0.1)),
    ]
    all_grads = {}
    for name, cls, cfg_cls, cfg in runs:
        tr, batch, loss, metrics, ids, grads = run_pairwise_trainer(cls, cfg_cls, adapter_sd, rows,
                                                                    backward=True, **cfg)
        same = [ids[i]["chosen_input_ids"] == dpo_seqs[i] and ids[i]["rejected_input_ids"] == dpo_seqs[4 + i]
                for i in range(4)]
        gfile = "%s_grads.safetensors" % name
        # one metadata key only: safetensors writes the metadata map in hash order
        st.save_file(grads, str(OUT / gfile), metadata={
            "description": "d/dLoRA of TRL %s %s loss (%s) from get_batch_loss_metrics(train) on the first "
                           "4 rows of standard.jsonl; loss=%r" % (
                               trl.__version__, cls.__name__,
                               ", ".join("%s=%s" % kv for kv in sorted(cfg.items())), loss)})
        all_grads[name] = grads
        print("grads %-9s loss %.8g global norm %.8g" % (name, loss, global_norm(grads)))
        out[name] = {"trainer": cls.__name__, "config": cfg, "loss": f32(loss), "metrics": metrics,
                     "same_token_ids_as_dpo": all(same), "grads": gfile}
    # SimPO / ORPO components recomputed from per-pair averages, for the record
    pol_c = np.array(dpo_res["per_pair"]["policy_chosen_logps"], np.float64)
    pol_r = np.array(dpo_res["per_pair"]["policy_rejected_logps"], np.float64)
    nc = np.array(dpo_res["per_pair"]["chosen_token_counts"], np.float64)
    nr = np.array(dpo_res["per_pair"]["rejected_token_counts"], np.float64)
    avg_c, avg_r = pol_c / nc, pol_r / nr
    simpo = float(np.mean(np.logaddexp(0.0, -2.0 * ((avg_c - avg_r) - 0.5 / 2.0))))
    assert abs(simpo - out["simpo"]["loss"]) < 1e-4, (simpo, out["simpo"]["loss"])

    # independent check of the SimPO gradients: plain HF forward + log_softmax on a fresh PEFT model,
    # loss from the per-pair average completion log-probs, on DPO's batch (the same token ids)
    pm = peft_policy(adapter_sd)
    pm.train()
    ids = torch.tensor(dpo_res["batch"]["input_ids"])
    am = torch.tensor(dpo_res["batch"]["attention_mask"])
    shift = torch.tensor(dpo_res["batch"]["completion_mask"])[:, 1:].float()
    lg = pm(input_ids=ids, attention_mask=am, use_cache=False).logits.float()
    avg = (torch.log_softmax(lg[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0] * shift).sum(1) / shift.sum(1)
    plain_loss = -F.logsigmoid(2.0 * ((avg[:4] - avg[4:]) - 0.5 / 2.0)).mean()
    plain_loss.backward()
    plain = lora_grads(pm)
    num = math.sqrt(sum(float(((plain[k].double() - g.double()) ** 2).sum()) for k, g in all_grads["simpo"].items()))
    rel = num / global_norm(all_grads["simpo"])
    print("simpo grads vs plain recomputation: relative error %.3g" % rel)
    assert rel < 1e-4, rel
    for k, g in all_grads["simpo"].items():
        assert torch.allclose(plain[k], g, atol=1e-6, rtol=1e-4), (k, (plain[k] - g).abs().max())
    log_odds = (avg_c - avg_r) - (np.log1p(-np.exp(avg_c)) - np.log1p(-np.exp(avg_r)))
    out["orpo"]["components"] = {
        "avg_chosen_logps": f32s(avg_c), "avg_rejected_logps": f32s(avg_r),
        "log_odds": f32s(log_odds),
        "log_sigmoid_log_odds_mean": f32(np.mean(-np.logaddexp(0.0, -log_odds))),
        "or_term_beta_times_mean": f32(0.1 * np.mean(-np.logaddexp(0.0, -log_odds))),
        "note": "loss = nll_loss - beta*mean(logsigmoid(log_odds)); nll_loss is the mean CE over ALL "
                "non-pad tokens of the chosen sequences, prompt included",
    }

    # KTO: the 4 pairs unpaired by the trainer into 4 desirable + 4 undesirable examples
    tok = tokenizer()
    kargs = KTOConfig(output_dir=os.path.join(TMP, "kto"), per_device_train_batch_size=8, beta=0.1,
                      **COMMON_ARGS)
    tr = KTOTrainer(model=base_model(), args=kargs, train_dataset=Dataset.from_list(copy.deepcopy(rows)),
                    processing_class=tok, peft_config=lora_config())
    assert tr.ref_model is None
    load_adapter_into(tr.model, adapter_sd)
    tr.model.train()
    feats = [tr.train_dataset[i] for i in range(len(tr.train_dataset))]
    batch = tr.data_collator(feats)
    with torch.no_grad():
        loss = float(tr.compute_loss(tr.model, batch))
        kl_pol = tr._compute_kl_logps(tr.model, batch)
        with tr.model.disable_adapter():
            kl_ref = tr._compute_kl_logps(tr.model, batch)
    metrics = {k: float(v[-1]) for k, v in sorted(tr._metrics["train"].items())}
    # the same loss again with autograd, for d(loss)/d(LoRA)
    tr.model.zero_grad(set_to_none=True)
    gloss = tr.compute_loss(tr.model, batch)
    assert abs(float(gloss.detach()) - loss) < 1e-7, (float(gloss), loss)
    gloss.backward()
    kto_grads = lora_grads(tr.model)
    assert set(kto_grads) == set(adapter_sd)
    st.save_file(kto_grads, str(OUT / "kto_grads.safetensors"), metadata={
        "description": "d/dLoRA of TRL %s KTOTrainer loss (beta=0.1, loss_type=kto, batch 8) from "
                       "compute_loss on the first 4 rows of standard.jsonl unpaired; loss=%r" % (
                           trl.__version__, loss)})
    print("grads kto       loss %.8g global norm %.8g" % (loss, global_norm(kto_grads)))
    # class weights: a second trainer with undesirable_weight 1.33 on the same batch
    wargs = KTOConfig(output_dir=os.path.join(TMP, "kto_w"), per_device_train_batch_size=8, beta=0.1,
                      desirable_weight=1.0, undesirable_weight=1.33, **COMMON_ARGS)
    wtr = KTOTrainer(model=base_model(), args=wargs, train_dataset=Dataset.from_list(copy.deepcopy(rows)),
                     processing_class=tok, peft_config=lora_config())
    load_adapter_into(wtr.model, adapter_sd)
    wtr.model.train()
    with torch.no_grad():
        weighted_loss = float(wtr.compute_loss(wtr.model, wtr.data_collator(feats)))
    # loss_type apo_zero_unpaired: no KL estimate; loss and gradients on the same examples
    aargs = KTOConfig(output_dir=os.path.join(TMP, "kto_apo"), per_device_train_batch_size=8, beta=0.1,
                      loss_type="apo_zero_unpaired", **COMMON_ARGS)
    atr = KTOTrainer(model=base_model(), args=aargs, train_dataset=Dataset.from_list(copy.deepcopy(rows)),
                     processing_class=tok, peft_config=lora_config())
    load_adapter_into(atr.model, adapter_sd)
    atr.model.train()
    afeats = [atr.train_dataset[i] for i in range(len(atr.train_dataset))]
    assert [(f["prompt_ids"], f["completion_ids"]) for f in afeats] == \
        [(f["prompt_ids"], f["completion_ids"]) for f in feats]
    atr.model.zero_grad(set_to_none=True)
    aloss = atr.compute_loss(atr.model, atr.data_collator(afeats))
    aloss.backward()
    apo_grads = lora_grads(atr.model)
    st.save_file(apo_grads, str(OUT / "kto_apo_zero_unpaired_grads.safetensors"), metadata={
        "description": "d/dLoRA of TRL %s KTOTrainer loss (beta=0.1, loss_type=apo_zero_unpaired, batch 8) "
                       "from compute_loss on the first 4 rows of standard.jsonl unpaired; loss=%r" % (
                           trl.__version__, float(aloss.detach()))})
    apo_zero_unpaired = {"loss_type": "apo_zero_unpaired", "loss": f32(float(aloss.detach())),
                         "grads": "kto_apo_zero_unpaired_grads.safetensors"}
    # check against the KTO formula with the DPO per-pair values (same sequences)
    labels = [bool(f["label"]) for f in feats]
    assert labels == [True] * 4 + [False] * 4
    kl = max(float(np.mean(np.array(f32s(kl_pol), np.float64) - np.array(f32s(kl_ref), np.float64))), 0.0)
    cl = np.array(dpo_res["per_pair"]["chosen_logratios"], np.float64)
    rl = np.array(dpo_res["per_pair"]["rejected_logratios"], np.float64)
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    kto = float(np.mean(np.concatenate([1 - sig(0.1 * (cl - kl)), 1 - sig(0.1 * (kl - rl))])))
    assert abs(kto - loss) < 1e-5, (kto, loss)
    out["kto"] = {
        "trainer": "KTOTrainer", "config": {"beta": 0.1, "loss_type": "kto", "desirable_weight": 1.0,
                                             "undesirable_weight": 1.0, "per_device_train_batch_size": 8},
        "examples": [{"label": bool(f["label"]), "prompt_ids": f["prompt_ids"], "completion_ids": f["completion_ids"],
                      "KL_completion_ids": f["KL_completion_ids"]} for f in feats],
        "policy_KL_logps": f32s(kl_pol), "reference_KL_logps": f32s(kl_ref),
        "kl": metrics["kl"], "loss": f32(loss), "metrics": metrics, "grads": "kto_grads.safetensors",
        "weighted": {"desirable_weight": 1.0, "undesirable_weight": 1.33, "loss": f32(weighted_loss)},
        "apo_zero_unpaired": apo_zero_unpaired,
        "note": "kl = clamp(mean(policy_KL_logps - reference_KL_logps), min=0), detached",
    }
    return out


# --------------------------------------------------------------------------- KTO's unpaired data
UNPAIRED_STANDARD = [
    {"prompt": "The sky is", "completion": " blue.", "label": True},
    {"prompt": "Two plus two is", "completion": " five.", "label": False},
    {"prompt": "Q: Sky color?\nA: ", "completion": "blue.", "label": True},
    {"prompt": "Water is", "completion": " dry.", "label": False},
    {"prompt": "Cats like to", "completion": " nap in the sun.", "label": True},
]

UNPAIRED_CONVERSATIONAL = [
    {"prompt": [msg("user", "Hi!")], "completion": [msg("assistant", "Hello.")], "label": True},
    {"prompt": [msg("system", "Be brief."), msg("user", "Sky color?")],
     "completion": [msg("assistant", "It depends.")], "label": False},
    {"prompt": [msg("user", "Hi"), msg("assistant", "Hello."), msg("user", "Name?")],
     "completion": [msg("assistant", "Ada.")], "label": True},
    {"prompt": [msg("user", "2+2?")], "completion": [msg("assistant", "5")], "label": False},
]


def make_unpaired_fixtures():
    """KTOTrainer's token ids of unpaired files (batch 2: each example's KL completion is its
    batch neighbour's)."""
    for name, rows in (("unpaired.jsonl", UNPAIRED_STANDARD),
                       ("unpaired_conversational.jsonl", UNPAIRED_CONVERSATIONAL)):
        with open(OUT / name, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        args = KTOConfig(output_dir=os.path.join(TMP, "kto_" + name), per_device_train_batch_size=2,
                         **COMMON_ARGS)
        tr = KTOTrainer(model=base_model(), args=args, train_dataset=Dataset.from_list(copy.deepcopy(rows)),
                        processing_class=tokenizer(), peft_config=lora_config())
        ds = tr.train_dataset
        assert len(ds) == len(rows)
        dump(OUT / (name + ".expected.json"), {
            "trl_version": trl.__version__, "model": MODEL_REL,
            "config": {"per_device_train_batch_size": 2, "max_length": 1024},
            "fields": "KTOTrainer(...).train_dataset columns (TRL 1.16 names), in order",
            "rows": [{"label": bool(ds[i]["label"]), "prompt_ids": ds[i]["prompt_ids"],
                      "completion_ids": ds[i]["completion_ids"],
                      "KL_completion_ids": ds[i]["KL_completion_ids"]} for i in range(len(ds))],
        })


# --------------------------------------------------------------------------- main
def main():
    os.chdir(ROOT)
    OUT.mkdir(parents=True, exist_ok=True)
    versions = {p: importlib.metadata.version(p) for p in
                ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers",
                 "safetensors", "numpy"]}
    versions["python"] = sys.version.split()[0]
    print("versions", versions)
    summary = make_data_fixtures()
    print("data", summary)
    make_unpaired_fixtures()
    adapter_sd = make_adapter()
    res = make_dpo_losses(adapter_sd)
    res["other_trainers"] = make_other_trainers(adapter_sd, res)
    res["versions"] = versions
    dump(OUT / "losses.json", res, indent=1)
    shutil.rmtree(TMP, ignore_errors=True)
    for name in ("sigmoid", "cpo", "simpo", "cpo_simpo", "orpo", "kto", "kto_apo_zero_unpaired"):
        (OUT / ("%s_grads.safetensors" % name)).chmod(0o644)
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print("total bytes", total)


if __name__ == "__main__":
    main()
