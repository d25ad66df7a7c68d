#!/usr/bin/env python3
"""Generate the LoRA (PEFT format) test fixtures under tests/fixtures/lora/.

Run by hand from the repository root:  python3 tools/make_lora_fixtures.py [NAME ...]
(with names, only those adapters are made and init_stats.json is left as it is).
Everything is seeded; re-running reproduces the same files.  Imports the float64 helpers of
tools/make_llama_fixtures.py (and therefore needs its packages too).

What it makes
-------------
tests/fixtures/lora/
  peft_r4/            LoraConfig(r=4, lora_alpha=8, lora_dropout=0, bias="none",
                      target_modules=q,k,v,o,gate,up,down) on tests/fixtures/llama/gqa_f32 (float32),
                      lora_A and lora_B overwritten with seeded N(0,1)*0.05 (PEFT's default B is zero,
                      which would make the adapter a no-op).  scaling = alpha/r = 2.
  peft_rslora_qv/     r=8, lora_alpha=16, use_rslora=True (scaling = alpha/sqrt(r) = 5.657),
                      target_modules=q_proj,v_proj, random A and B as above.
  peft_dora/          r=4, lora_alpha=8, use_dora=True on all seven projections, random A and B as
                      above and the magnitude vectors (PEFT's lora_magnitude_vector, initialised to
                      the row norms of W) scaled by seeded 1 + 0.1*N(0,1).  Checked against merged
                      weights m / ||W + s*B@A||_row * (W + s*B@A).
    each: adapter_config.json, adapter_model.safetensors (PEFT save_pretrained), expected.json:
      "sequences"      the 3 sequences of gqa_f32/expected.json
      "logprobs"       float64 per-token log p(x[t+1] | x[..t]) of base+adapter, each sequence alone
                       (PEFT model .to(float64) with RMSNorm/softmax/RoPE kept in float64, cross-checked
                       against a plain-torch forward on merged weights W + scaling * B @ A)
      "logprobs_f32"   the same, PEFT in float32 (unpatched)
      "base_logprobs"  float64 without the adapter (== gqa_f32/expected.json "logprobs")
      "scaling"        the scaling PEFT applies
      "grads"          peft_dora only: d(sum of the float64 log-probs of all sequences)/d(tensor)
                       for the lora_A, lora_B and lora_magnitude_vector tensors of layer 0's q_proj
                       and layer 1's down_proj (PEFT in float64; keys as in the safetensors file,
                       values row-major); DoRA's row norm is detached, as PEFT does
  init_stats.json     what PEFT's default init gives: lora_A ~ kaiming_uniform_(a=sqrt(5)) ->
                      U(-bound, bound) with bound = sqrt(6 / ((1 + a^2) * fan_in)) = 1/sqrt(in_features);
                      lora_B = 0.

Versions used to generate the committed files:
  python 3.11.7, torch 2.15.0, transformers 5.23.0, peft 0.21.2, accelerate 1.15.0,
  safetensors 0.8.0, numpy 2.4.6.
"""

import copy
import importlib.metadata
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

import peft
import safetensors.torch as st
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_llama_fixtures as mlf  # noqa: E402  (float64 helpers; also sets 1 thread + deterministic)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "lora"
GQA = ROOT / "tests" / "fixtures" / "llama" / "gqa_f32"

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = [
    # name, seed, LoraConfig kwargs
    ("peft_r4", 101, dict(r=4, lora_alpha=8, target_modules=ALL)),
    ("peft_rslora_qv", 102, dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"])),
    ("peft_dora", 103, dict(r=4, lora_alpha=8, use_dora=True, target_modules=ALL)),
]


def load_base():
    return AutoModelForCausalLM.from_pretrained(GQA, dtype=torch.float32, attn_implementation="eager").eval()


def lora_config(kw):
    return LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **kw)


def normalise_saved(d):
    """Make the saved adapter reproducible and machine-independent: PEFT stores target_modules as a
    set (order depends on PYTHONHASHSEED) and the absolute base-model path; it also writes a model
    card README.md.  Rewrite adapter_config.json the way PEFT writes it (indent 2, sorted keys) with
    target_modules sorted and a repository-relative base path; drop the README."""
    p = d / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg["base_model_name_or_path"] = "tests/fixtures/llama/gqa_f32"
    p.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (d / "README.md").unlink(missing_ok=True)


@torch.no_grad()
def logprobs_pair(m32, sequences):
    m64 = copy.deepcopy(m32).to(torch.float64).eval()
    lp32 = [mlf.seq_logprobs(m32, s)[0] for s in sequences]
    with mlf.hf_true_f64():
        res64 = [mlf.seq_logprobs(m64, s) for s in sequences]
    return [r[0] for r in res64], [r[1] for r in res64], lp32


@torch.no_grad()
def make_adapter(name, seed, kw, sequences, base_lp64):
    d = OUT / name
    if d.exists():
        shutil.rmtree(d)
    cfg = lora_config(kw)
    model = get_peft_model(load_base(), cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    for pname, p in sorted(model.named_parameters()):
        if ".lora_A." in pname or ".lora_B." in pname:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.05)
        elif ".lora_magnitude_vector." in pname:
            p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float32))
    model.save_pretrained(d)
    normalise_saved(d)

    # reload from disk, exactly as a user would, and compute the references from that
    reloaded = PeftModel.from_pretrained(load_base(), d).eval()
    lp64, logits64, lp32 = logprobs_pair(reloaded, sequences)

    # independent check: plain-torch f64 forward on merged weights W + scaling * B @ A
    sd = st.load_file(str(d / "adapter_model.safetensors"))
    base_sd = dict(load_base().state_dict())
    scaling = kw["lora_alpha"] / (math.sqrt(kw["r"]) if kw.get("use_rslora") else kw["r"])
    merged = {k: v.to(torch.float64) for k, v in base_sd.items()}
    n_targets = 0
    for k in sd:
        if k.endswith(".lora_A.weight"):
            mod = k[len("base_model.model."): -len(".lora_A.weight")]
            A = sd[k].to(torch.float64)
            B = sd[k.replace(".lora_A.", ".lora_B.")].to(torch.float64)
            w = merged[mod + ".weight"] + scaling * (B @ A)
            if kw.get("use_dora"):
                m = sd[k.replace(".lora_A.weight", ".lora_magnitude_vector")].to(torch.float64)
                w = (m / w.norm(dim=1)).unsqueeze(1) * w
            merged[mod + ".weight"] = w
            n_targets += 1
    for s, logits in zip(sequences, logits64):
        err = (mlf.ref_forward(merged, reloaded.config, s) - logits).abs().max().item()
        assert err < 1e-9, f"{name}: PEFT f64 vs merged ref_forward {err}"
    err32 = max(abs(a - b) for x, y in zip(lp32, lp64) for a, b in zip(x, y))
    assert err32 < 1e-3, err32
    shift = max(abs(a - b) for x, y in zip(lp64, base_lp64) for a, b in zip(x, y))
    assert shift > 1e-3, f"{name}: adapter barely changes the output ({shift})"
    assert abs(reloaded.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] - scaling) < 1e-12

    expected = {
        "sequences": sequences, "logprobs": lp64, "logprobs_f32": lp32, "base_logprobs": base_lp64,
        "scaling": scaling,
    }
    if kw.get("use_dora"):
        expected["grads"] = dora_grads(d, sequences)
    mlf.dump(d / "expected.json", expected)
    keys = {k: list(v.shape) for k, v in sd.items()}
    print(f"{name}: {n_targets} targets, scaling {scaling}, max f32 err {err32:.3g}, adapter shift {shift:.3g}")
    return keys, json.loads((d / "adapter_config.json").read_text())


GRAD_SITES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


def dora_grads(d, sequences):
    """Gradients of the summed float64 log-probs with respect to a few DoRA tensors (see above)."""
    model = PeftModel.from_pretrained(load_base(), d, is_trainable=True).to(torch.float64).eval()
    with torch.enable_grad(), mlf.hf_true_f64():
        total = 0.0
        for s in sequences:
            logits = model(torch.tensor([s])).logits[0]
            lp = torch.log_softmax(logits, -1)
            total = total + lp[torch.arange(len(s) - 1), torch.tensor(s[1:])].sum()
        total.backward()
    grads = {}
    for site in GRAD_SITES:
        mod = model.base_model.model.get_submodule(site)
        for key, p in [("lora_A.weight", mod.lora_A["default"].weight),
                       ("lora_B.weight", mod.lora_B["default"].weight),
                       ("lora_magnitude_vector", mod.lora_magnitude_vector["default"].weight)]:
            grads[f"base_model.model.{site}.{key}"] = p.grad.flatten().tolist()
    return grads


def init_stats():
    """PEFT's default lora_A / lora_B init for r=4 on the 64- and 176-wide inputs of gqa_f32."""
    torch.manual_seed(0)
    model = get_peft_model(load_base(), lora_config(dict(r=4, lora_alpha=8, target_modules=ALL)))
    out = {"formula": "lora_A: torch.nn.init.kaiming_uniform_(w, a=sqrt(5)) on w [r, in]: fan_in = in, "
                      "gain = sqrt(2/(1+a^2)) = sqrt(1/3), bound = gain*sqrt(3/fan_in) = 1/sqrt(in); "
                      "U(-bound, bound). lora_B: zeros. (peft/tuners/lora/layer.py reset_lora_parameters)",
           "layers": {}}
    for name, mod in [("q_proj", model.base_model.model.model.layers[0].self_attn.q_proj),
                      ("down_proj", model.base_model.model.model.layers[0].mlp.down_proj)]:
        A = mod.lora_A["default"].weight.detach()
        B = mod.lora_B["default"].weight.detach()
        fan_in = A.shape[1]
        a = math.sqrt(5)
        bound = math.sqrt(2.0 / (1 + a * a)) * math.sqrt(3.0 / fan_in)
        assert abs(bound - 1 / math.sqrt(fan_in)) < 1e-15
        assert A.abs().max().item() <= bound and bool((B == 0).all())
        out["layers"][name] = {
            "lora_A_shape": list(A.shape), "lora_B_shape": list(B.shape), "in_features": fan_in,
            "bound": bound, "observed_abs_max": A.abs().max().item(),
            "observed_mean": A.mean().item(), "observed_std": A.std().item(),
            "uniform_std": bound / math.sqrt(3), "lora_B_all_zero": bool((B == 0).all()),
        }
    out["bound_in_64"] = 1 / math.sqrt(64)
    out["bound_in_176"] = 1 / math.sqrt(176)
    return out


def main():
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"accelerate {importlib.metadata.version('accelerate')}, numpy {np.__version__}")
    OUT.mkdir(parents=True, exist_ok=True)
    gqa = json.loads((GQA / "expected.json").read_text())
    sequences = gqa["sequences"]
    base_lp64, _, _ = logprobs_pair(load_base(), sequences)
    err = max(abs(a - b) for x, y in zip(base_lp64, gqa["logprobs"]) for a, b in zip(x, y))
    assert err < 1e-12, err
    only = set(sys.argv[1:])
    for name, seed, kw in ADAPTERS:
        if only and name not in only:
            continue
        keys, acfg = make_adapter(name, seed, kw, sequences, base_lp64)
        for k in sorted(keys):
            if ".layers.0." in k:
                print("  ", k, keys[k])
        print("  ", json.dumps(acfg, sort_keys=True))
    if not only:
        mlf.dump(OUT / "init_stats.json", init_stats())

    total = 0
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"{p.stat().st_size:>9}  {p.relative_to(ROOT)}")
    print(f"{total:>9}  total")


if __name__ == "__main__":
    main()
