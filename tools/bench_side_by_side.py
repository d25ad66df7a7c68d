#!/usr/bin/env python3
"""prefer vs TRL on the CPU, both sides measured the same way, over several rounds.

The shape and the TRL side are `../shared/bench/side_by_side_cpu.py`'s (random Llama, hidden 256, 4
layers, vocab 4096, 4 pairs of 256 tokens a step, LoRA r 8 on all seven projections, f32). What
differs is how a step is timed, so that the two sides compare like with like:

  s/step   both sides: the MEDIAN of the per-step wall times after the first step. TRL's from a
           callback around each optimiser step (trl_cpu_bench.py, WARMUP = 1 step dropped); prefer's
           from metrics.jsonl with logging_steps = 1 (each row's `tokens / tokens_per_second` is
           that step's whole wall time, the first step dropped).
  cores    CPU-s per step / s per step. TRL: median CPU-s of a step / median s. prefer: CPU time and
           wall of a 12-step run minus those of a 2-step run (start-up cancels), divided.
  rounds   TRL, prefer f32, prefer NF4, repeated R times in that order; each round's ratio is
           prefer / that round's TRL, and the report gives the median ratio over rounds and its range.

Usage: python tools/bench_side_by_side.py PREFER_BIN [--rounds 3] [--workdir DIR]
(a Python with ../shared/bench/requirements.txt; PREFER_BIN a release build of `prefer`).
Prints a table and RESULT {json}.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "bench")
sys.path.insert(0, SHARED)
import side_by_side_cpu as sbs  # noqa: E402
import trl_cpu_bench as tb  # noqa: E402

N_SHORT, N_LONG = 2, 12


def prefer_cmd(binary, model, out, steps, nf4):
    return [binary, "train", "--model", model, "--data", os.path.join(model, "pairs.jsonl"), "--output", out,
            "--eval_ratio", "0", "--max_steps", str(steps), "--per_device_train_batch_size",
            str(tb.PAIRS_PER_STEP), "--learning_rate", str(tb.LR), "--lr_scheduler_type", "constant",
            "--beta", str(tb.BETA), "--r", "8", "--lora_alpha", "16", "--lora_dropout", "0",
            "--target_modules", "all-linear", "--logging_steps", "1", "--save_steps", "100000",
            "--load_in_4bit", "true" if nf4 else "false", "--seed", "0"]


def step_seconds(out):
    """Each optimiser step's wall time from metrics.jsonl, in order."""
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r["tokens"] / r["tokens_per_second"] for r in rows if "tokens_per_second" in r]


def run_prefer(binary, model, work, nf4, tag):
    runs = {}
    for n in (N_SHORT, N_LONG):
        out = os.path.join(work, f"prefer-{tag}-{n}")
        runs[n] = sbs.timed(prefer_cmd(binary, model, out, n, nf4), out + ".log") + (out,)
    steps = step_seconds(runs[N_LONG][3])
    assert len(steps) == N_LONG, f"{len(steps)} step rows in metrics.jsonl"
    wall = runs[N_LONG][0] - runs[N_SHORT][0]
    cpu = runs[N_LONG][2] - runs[N_SHORT][2]
    median = statistics.median(steps[1:])
    return {"s_per_step": median, "cores": cpu / wall, "mean_s_per_step_from_walls": wall / (N_LONG - N_SHORT),
            "peak_rss_mb": max(runs[N_SHORT][1], runs[N_LONG][1]), "step_s": steps}


def run_trl(steps):
    r = sbs.run_trl(steps)
    return {"s_per_step": r["s_per_step"], "cores": r["cpu_s_per_step"] / r["s_per_step"],
            "peak_rss_mb": r["peak_rss_mb"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("prefer")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trl-steps", type=int, default=N_LONG - 1)
    ap.add_argument("--workdir")
    a = ap.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="sbs-rounds-")
    model = os.path.join(work, "model")
    os.makedirs(model, exist_ok=True)
    sbs.export(model)
    # export writes (10 + 2) * 4 pairs; 12 steps of 4 need 48.
    with open(os.path.join(model, "pairs.jsonl")) as f:
        assert sum(1 for _ in f) >= N_LONG * tb.PAIRS_PER_STEP

    rounds = []
    for i in range(a.rounds):
        r = {"loadavg": open("/proc/loadavg").read().split()[:3], "trl": run_trl(a.trl_steps)}
        r["f32"] = run_prefer(a.prefer, model, work, False, f"{i}-f32")
        r["nf4"] = run_prefer(a.prefer, model, work, True, f"{i}-nf4")
        for k in ("f32", "nf4"):
            r[k]["time_vs_trl"] = r[k]["s_per_step"] / r["trl"]["s_per_step"]
            r[k]["rss_vs_trl"] = r[k]["peak_rss_mb"] / r["trl"]["peak_rss_mb"]
        rounds.append(r)
        print(f"round {i + 1}: TRL {r['trl']['s_per_step']:.3f} s ({r['trl']['cores']:.2f} cores), "
              f"prefer f32 {r['f32']['s_per_step']:.3f} s ({r['f32']['cores']:.2f} cores, "
              f"{r['f32']['time_vs_trl']:.2f}x), NF4 {r['nf4']['s_per_step']:.3f} s "
              f"({r['nf4']['cores']:.2f} cores, {r['nf4']['time_vs_trl']:.2f}x)", flush=True)

    summary = {}
    for k in ("f32", "nf4"):
        ratios = [r[k]["time_vs_trl"] for r in rounds]
        cores = [r[k]["cores"] for r in rounds]
        rss = [r[k]["rss_vs_trl"] for r in rounds]
        summary[k] = {"median_time_vs_trl": statistics.median(ratios), "time_vs_trl_range": [min(ratios), max(ratios)],
                      "median_cores": statistics.median(cores), "cores_range": [min(cores), max(cores)],
                      "max_rss_vs_trl": max(rss)}
    trl_cores = [r["trl"]["cores"] for r in rounds]
    print(f"{'':10s} {'median time vs TRL':>19s} {'range':>13s} {'median cores':>13s} {'range':>11s} {'RSS vs TRL':>11s}")
    for k, s in summary.items():
        print(f"prefer {k:3s} {s['median_time_vs_trl']:18.2f}x {s['time_vs_trl_range'][0]:6.2f}-{s['time_vs_trl_range'][1]:.2f}x "
              f"{s['median_cores']:13.2f} {s['cores_range'][0]:5.2f}-{s['cores_range'][1]:.2f} {s['max_rss_vs_trl']:10.2f}x")
    print(f"TRL cores {min(trl_cores):.2f}-{max(trl_cores):.2f}")
    print("RESULT " + json.dumps({"rounds": rounds, "summary": summary}))


if __name__ == "__main__":
    main()
