"""Fixtures for prefer's trainer: Hugging Face learning-rate schedules and one TRL-style optimiser
step sequence (averaged micro-batch gradients, global-norm clipping, torch AdamW).

Run by hand: python tools/make_train_fixtures.py  (torch, transformers)
Writes tests/fixtures/train/{schedules,plateaus,adamw_clip}.json.
"""
import json
import os

import torch
from transformers import get_scheduler

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "train")
os.makedirs(OUT, exist_ok=True)

# --- schedules: the rate used by optimiser step s (0-based), as Trainer steps LambdaLR after each step
schedules = []


def schedule(kind, total, warmup, specific=None):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=3e-4)
    sched = get_scheduler(kind, opt, num_warmup_steps=warmup, num_training_steps=total,
                          scheduler_specific_kwargs=specific)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    case = {"kind": kind, "total": total, "warmup": warmup if kind != "constant" else 0,
            "peak": 3e-4, "lrs": lrs}
    if specific:
        case["lr_scheduler_kwargs"] = specific
    schedules.append(case)


for kind in ["linear", "cosine", "constant", "constant_with_warmup"]:
    for total, warmup in [(10, 0), (10, 3), (7, 2), (1, 0)]:
        schedule(kind, total, warmup)
# The schedules that take `lr_scheduler_kwargs`, with their defaults and with other values.
for total, warmup in [(12, 0), (12, 3), (7, 2)]:
    schedule("cosine", total, warmup, {"num_cycles": 1.5})
    schedule("cosine_with_restarts", total, warmup)
    schedule("cosine_with_restarts", total, warmup, {"num_cycles": 3})
    schedule("polynomial", total, warmup)
    schedule("polynomial", total, warmup, {"lr_end": 1e-5, "power": 2.0})
    schedule("inverse_sqrt", total, warmup)
    schedule("inverse_sqrt", total, warmup, {"timescale": 5})
    schedule("cosine_with_min_lr", total, warmup, {"min_lr": 3e-5})
    schedule("cosine_with_min_lr", total, warmup, {"min_lr_rate": 0.2, "num_cycles": 0.75})
    schedule("warmup_stable_decay", total, warmup, {"num_decay_steps": 4})
    schedule("warmup_stable_decay", total, warmup,
             {"num_decay_steps": 3, "num_stable_steps": 2, "warmup_type": "cosine",
              "decay_type": "1-sqrt", "min_lr_ratio": 0.1})
    schedule("warmup_stable_decay", total, warmup,
             {"num_decay_steps": 5, "warmup_type": "1-sqrt", "decay_type": "linear"})
json.dump(schedules, open(os.path.join(OUT, "schedules.json"), "w"), indent=1)

# --- reduce_lr_on_plateau: the rate after each evaluation's metric, as Trainer steps torch's
# ReduceLROnPlateau with `metrics[metric_for_best_model]` after every evaluation.
plateaus = []
rng = torch.Generator().manual_seed(11)
# A noisy loss that falls, stalls, falls again and stalls, so every rule has plateaus to find.
trend = torch.cat([torch.linspace(0.7, 0.5, 10), torch.full((12,), 0.5), torch.linspace(0.5, 0.3, 6),
                   torch.full((12,), 0.3)])
metrics = (trend + 0.01 * torch.randn(len(trend), generator=rng, dtype=torch.float64)).tolist()
for specific in [{}, {"patience": 2}, {"patience": 1, "factor": 0.5, "cooldown": 2},
                 {"mode": "max", "patience": 2, "threshold": 0.01},
                 {"threshold_mode": "abs", "threshold": 0.005, "patience": 1, "min_lr": 1e-5},
                 {"patience": 0, "factor": 0.5, "eps": 1e-5}]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=3e-4)
    sched = get_scheduler("reduce_lr_on_plateau", opt, scheduler_specific_kwargs=specific)
    lrs = []
    for m in metrics:
        sched.step(m)
        lrs.append(opt.param_groups[0]["lr"])
    plateaus.append({"lr_scheduler_kwargs": specific, "peak": 3e-4, "metrics": metrics, "lrs": lrs})
json.dump(plateaus, open(os.path.join(OUT, "plateaus.json"), "w"), indent=1)

# --- AdamW with averaged accumulation and global-norm clipping
g = torch.Generator().manual_seed(7)
shapes = [[3, 4], [5]]
params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).float()) for s in shapes]
init = [p.detach().clone() for p in params]
opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
accum, max_norm = 2, 0.5
steps = []
for step in range(4):
    micro = [[(torch.randn(s, generator=g, dtype=torch.float64) * (1 + step)).float() for s in shapes]
             for _ in range(accum)]
    for p, gs in zip(params, zip(*micro)):
        p.grad = sum(gs) / accum
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    opt.zero_grad()
    steps.append({
        "micro_grads": [[m.flatten().tolist() for m in mb] for mb in micro],
        "grad_norm": float(norm),
        "params": [p.detach().flatten().tolist() for p in params],
    })
json.dump({"shapes": shapes, "init": [p.flatten().tolist() for p in init], "lr": 1e-2,
           "accum": accum, "max_norm": max_norm, "steps": steps},
          open(os.path.join(OUT, "adamw_clip.json"), "w"), indent=1)
print("wrote", OUT)
