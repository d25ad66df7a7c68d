#!/usr/bin/env python3
"""Check that the Python stack (transformers, PEFT, bitsandbytes) loads what prefer writes.

Run by hand from anywhere, after building prefer's binaries (`cargo build --examples --bins`):
    python3 tools/check_interop.py [--prefer-bin-dir /root/.cache/prefer-target/debug] [--out /tmp]
Prints one PASS/FAIL line per check (plus INFO lines) and exits 1 if any check fails.

Checks
------
adapter   `examples/export_adapter gqa_f32 OUT/prefer-adapter` writes a PEFT adapter and prints
          prefer's f32 per-token log-probs.  PeftModel.from_pretrained must load every tensor of the
          file (compared with get_peft_model_state_dict), the adapter must change the output, and
          PEFT's f32 log-probs must match prefer's.
dora      the same with `export_adapter ... --dora`: a DoRA adapter (magnitudes moved off their
          initial row norms) that PEFT loads whole, `use_dora` set, with prefer's log-probs.
nf4       `prefer quantize --model gqa_f32 --output OUT/prefer-nf4`.  AutoModelForCausalLM must load
          it on CPU with no missing/unexpected keys; every Linear4bit's packed weight and quant_state
          (blocksize, shape, offset, absmax codes, nested absmax, codes, nested blocksize) must equal
          bitsandbytes.functional.quantize_4bit(W_f32, 64, compress_statistics=True, "nf4"); the other
          weights must equal gqa_f32's.  Log-probs of the loaded model, computed (float64, like
          tools/make_nf4_fixtures.py) on a dense model holding the correctly dequantised weights, must
          match tests/fixtures/nf4/gqa_f32_bnb4/expected.json "logprobs", which prefer's own tests
          match to 1e-5.  The stock transformers+bitsandbytes CPU forward is only reported (INFO):
          bitsandbytes 0.50.2's CPU dequantize_4bit kernel is wrong for the 176-wide down_proj and its
          AVX512-BF16 path asserts out_features % 32 == 0.
merged    `prefer merge --model gqa_f32 --adapter tests/fixtures/lora/peft_r4 --output OUT/prefer-merged`
          loaded by transformers in f32 (no missing/unexpected keys) must reproduce
          tests/fixtures/lora/peft_r4/expected.json "logprobs".
(That prefer reads directories transformers writes is covered by the fixtures themselves.)

Log-probs agree when |a - b| <= max(1e-5 * |b|, 1e-6) for every token.

Versions used: python 3.11, torch 2.15.0, transformers 5.23.0, peft 0.21.2, bitsandbytes 0.50.2,
safetensors 0.8.0, numpy 2.4.6.
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

import bitsandbytes
import bitsandbytes.functional as BF
import peft
import safetensors.torch as st
import transformers
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_llama_fixtures as mlf  # noqa: E402  (float64 helpers; also sets 1 thread + deterministic)
import make_nf4_fixtures as mnf  # noqa: E402  (PURE_DEQ4: bnb's pure-PyTorch dequantiser)

ROOT = Path(__file__).resolve().parents[1]
GQA = "tests/fixtures/llama/gqa_f32"
NF4_EXPECTED = ROOT / "tests/fixtures/nf4/gqa_f32_bnb4/expected.json"
R4 = "tests/fixtures/lora/peft_r4"
RTOL, ATOL = 1e-5, 1e-6

transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)


def run(cmd):
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def load(path, **kw):
    """from_pretrained that fails on missing/unexpected/mismatched keys instead of warning."""
    model, info = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", output_loading_info=True, **kw)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    assert not bad, f"{path}: {bad}"
    return model.eval()


def compare(got, want):
    """(ok, message) for two lists of per-token log-prob lists."""
    assert [len(s) for s in got] == [len(s) for s in want], "sequence lengths differ"
    a = np.array([v for s in got for v in s], np.float64)
    b = np.array([v for s in want for v in s], np.float64)
    d = np.abs(a - b)
    ok = bool(np.all(d <= np.maximum(RTOL * np.abs(b), ATOL)))
    return ok, f"{a.size} tokens, max |diff| {d.max():.3g}, max rel {(d / np.abs(b)).max():.3g}"


def logprobs(model, sequences):
    return [mlf.seq_logprobs(model, s)[0] for s in sequences]


# ------------------------------------------------------------------------------------------ checks
@torch.no_grad()
def check_adapter(bindir, out, dora=False):
    d = out / ("prefer-dora" if dora else "prefer-adapter")
    got = json.loads(run([bindir / "examples" / "export_adapter", GQA, d] + (["--dora"] if dora else [])))
    model = PeftModel.from_pretrained(load(ROOT / GQA, dtype=torch.float32), d).eval()
    # PEFT only warns about adapter keys it cannot place: check every tensor arrived
    file_sd = st.load_file(str(d / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    assert sorted(file_sd) == sorted(loaded), f"keys differ: {sorted(set(file_sd) ^ set(loaded))}"
    for k, v in file_sd.items():
        assert torch.equal(v, loaded[k]), f"{k} differs after loading"
    n_mod = sum(k.endswith("lora_A.weight") for k in file_sd)
    n_mag = sum(k.endswith("lora_magnitude_vector") for k in file_sd)
    assert n_mag == (n_mod if dora else 0), f"{n_mag} magnitude vectors for {n_mod} modules"
    assert model.peft_config["default"].use_dora == dora
    lp = logprobs(model, got["sequences"])
    with model.disable_adapter():
        base = logprobs(model, got["sequences"])
    shift = max(abs(x - y) for s, t in zip(lp, base) for x, y in zip(s, t))
    assert shift > 1e-3, f"adapter does not change the output (shift {shift:.3g})"
    ok, msg = compare(lp, got["logprobs"])
    return ok, f"{n_mod} LoRA modules loaded, adapter shift {shift:.3g}; PEFT f32 vs prefer f32: {msg}"


@torch.no_grad()
def check_nf4(bindir, out, info):
    d = out / "prefer-nf4"
    run([bindir / "prefer", "quantize", "--model", GQA, "--output", d])
    dense = load(ROOT / GQA, dtype=torch.float32)
    dense_sd = {k: v.clone() for k, v in dense.state_dict().items()}
    m4 = load(d, device_map="cpu", dtype=torch.float32)

    diffs, deq = [], {}
    for name, mod in m4.named_modules():
        if not isinstance(mod, bitsandbytes.nn.Linear4bit):
            continue
        key = name + ".weight"
        packed, ref = BF.quantize_4bit(dense_sd[key], blocksize=64, compress_statistics=True, quant_type="nf4")
        qs = mod.weight.quant_state
        fields = {
            "packed weight": (mod.weight.data, packed),
            "blocksize": (qs.blocksize, ref.blocksize),
            "shape": (tuple(qs.shape), tuple(ref.shape)),
            "quant_type": (qs.quant_type, ref.quant_type),
            "code": (qs.code, ref.code),
            "nested": (qs.nested, ref.nested),
            "offset": (qs.offset.reshape(()), ref.offset.reshape(())),
            "absmax codes": (qs.absmax, ref.absmax),
            "nested absmax": (qs.state2.absmax, ref.state2.absmax),
            "nested code": (qs.state2.code, ref.state2.code),
            "nested blocksize": (qs.state2.blocksize, ref.state2.blocksize),
        }
        for f, (g, w) in fields.items():
            if isinstance(w, torch.Tensor):
                same = g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w)
                if not same:
                    detail = f"{g.dtype}{list(g.shape)} vs {w.dtype}{list(w.shape)}"
                    if g.shape == w.shape and g.dtype == w.dtype:
                        ne = (g != w).nonzero()
                        detail += f", {len(ne)} differ, first at {ne[0].tolist()}: {g[tuple(ne[0])].item()!r} vs {w[tuple(ne[0])].item()!r}"
                    diffs.append(f"{name} {f}: {detail}")
            elif g != w:
                diffs.append(f"{name} {f}: {g!r} vs {w!r}")
        # correct dequantisation (the C++ CPU dequantize_4bit is wrong for the 176-wide down_proj)
        am = BF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        deq[key] = mnf.PURE_DEQ4(mod.weight.data.reshape(-1), am, qs.code, qs.blocksize, qs.shape, torch.float32)
    m4_sd = m4.state_dict()
    for k, v in dense_sd.items():
        if k not in deq and not torch.equal(m4_sd[k], v):
            diffs.append(f"{k}: differs from gqa_f32")
    assert len(deq) == 14, f"{len(deq)} Linear4bit modules, expected 14"
    assert not diffs, "; ".join(diffs[:8]) + (f" (+{len(diffs) - 8} more)" if len(diffs) > 8 else "")

    expected = json.loads(NF4_EXPECTED.read_text())
    sequences = expected["sequences"]
    m32 = copy.deepcopy(dense)
    m32.load_state_dict({**dense_sd, **deq})
    m64 = m32.to(torch.float64).eval()
    with mlf.hf_true_f64():
        lp = logprobs(m64, sequences)
    ok, msg = compare(lp, expected["logprobs"])

    # what transformers + bitsandbytes itself computes (informational)
    def stock(label, disable_bf16_repack):
        model = load(d, device_map="cpu", dtype=torch.float32)  # fresh: a CPU forward may repack in place
        for mod in model.modules():
            if isinstance(mod, bitsandbytes.nn.Linear4bit) and disable_bf16_repack:
                mod.support_avx512bf16_for_cpu = False
        try:
            got = logprobs(model, sequences)
            err = max(abs(x - y) for s, t in zip(got, lp) for x, y in zip(s, t))
            info.append(f"nf4: {label} runs; max |logprob - correct| = {err:.3g}")
            return True
        except Exception as e:
            info.append(f"nf4: {label} fails: {type(e).__name__}: {e}")
            return False

    if not stock("stock transformers+bitsandbytes CPU forward", False):
        stock("same with Linear4bit.support_avx512bf16_for_cpu=False", True)
    return ok, f"14 Linear4bit weights + quant_states == quantize_4bit(W, 64, True, nf4); " \
               f"loaded-model log-probs (f64, correct dequant) vs gqa_f32_bnb4 expected: {msg}"


@torch.no_grad()
def check_merged(bindir, out):
    d = out / "prefer-merged"
    run([bindir / "prefer", "merge", "--model", GQA, "--adapter", R4, "--output", d])
    model = load(d, dtype=torch.float32)
    dtypes = {str(v.dtype) for v in st.load_file(str(d / "model.safetensors")).values()}
    assert dtypes == {"torch.float32"}, f"merged dtypes {dtypes}"
    expected = json.loads((ROOT / R4 / "expected.json").read_text())
    ok, msg = compare(logprobs(model, expected["sequences"]), expected["logprobs"])
    return ok, f"transformers f32 vs peft_r4 expected: {msg}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefer-bin-dir", type=Path, default=Path("/root/.cache/prefer-target/debug"))
    ap.add_argument("--out", type=Path, default=Path("/tmp"), help="where prefer writes its outputs")
    args = ap.parse_args()
    bindir, out = args.prefer_bin_dir.resolve(), args.out.resolve()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}, numpy {np.__version__}")
    info, failed = [], 0
    for name, fn in [("adapter", lambda: check_adapter(bindir, out)),
                     ("dora", lambda: check_adapter(bindir, out, dora=True)),
                     ("nf4", lambda: check_nf4(bindir, out, info)),
                     ("merged", lambda: check_merged(bindir, out))]:
        try:
            ok, msg = fn()
        except Exception as e:
            ok, msg = False, f"{type(e).__name__}: {e}"
            if os.environ.get("CHECK_INTEROP_TRACEBACK"):
                traceback.print_exc()
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name}: {msg}", flush=True)
    for line in info:
        print(f"INFO {line}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
