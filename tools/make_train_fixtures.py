"""Fixtures for prefer's trainer: Hugging Face learning-rate schedules and one TRL-style optimiser
step sequence (averaged micro-batch gradients, global-norm clipping, torch AdamW).

Run by hand: python tools/make_train_fixtures.py  (torch, transformers)
Writes tests/fixtures/train/{schedules,adamw_clip}.json.
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
