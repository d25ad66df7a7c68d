"""Half-precision DPO fixtures: TRL 1.16's DPOTrainer on the CPU with the tiny Llama loaded in
bfloat16 (`dtype=torch.bfloat16`, `bf16=True`) and in float16 (`fp16`-style: the model in float16,
no autocast, since accelerate refuses fp16 mixed precision on the CPU), the PEFT adapter of
`make_dpo_fixtures.py` in float32 (PEFT keeps adapter weights in f32 over a half base), on the
same 4-pair batch as `losses.json`.

Writes into tests/fixtures/dpo/:
  half.json                      per dtype: per-token log-probs of every completion token (policy),
                                 per-row sums (policy and reference = adapter off), the sigmoid
                                 loss (beta 0.1)
  bf16_grads.safetensors         d(loss)/d(every LoRA parameter), f32, keyed as the adapter file
  fp16_grads.safetensors         the same in float16

The float32 values these are compared with are `losses.json`'s (`per_pair`, `sigmoid_grads`). The
tests judge prefer's half-precision numbers by their distance to the float32 ones against the
distance of these (bf16 rounds to 8 significant bits: no two implementations agree exactly).

Run from the repository root with the venv of tools/: `python tools/make_half_fixtures.py`.
"""

import json
import os
import sys
from pathlib import Path

import torch
import safetensors.torch as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_dpo_fixtures as m  # noqa: E402  (the tiny model, adapter, rows and helpers)

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402


def trainer(dtype):
    tok = m.tokenizer()
    model = AutoModelForCausalLM.from_pretrained(m.MODEL_REL, dtype=dtype)
    args = dict(m.COMMON_ARGS)
    args["bf16"] = dtype == torch.bfloat16
    args = DPOConfig(output_dir=os.path.join(m.TMP, "half"), per_device_train_batch_size=4,
                     loss_type="sigmoid", beta=0.1, label_smoothing=0.0, **args)
    tr = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(m.STANDARD[:4]),
                    processing_class=tok, peft_config=m.lora_config())
    adapter_sd = st.load_file(str(m.ADAPTER_DIR / "adapter_model.safetensors"))
    m.load_adapter_into(tr.model, {k: v.to(torch.float32) for k, v in adapter_sd.items()})
    tr.model.train()
    return tr


def half_values(dtype):
    tr = trainer(dtype)
    batch = m.batch_of(tr, 4)
    want = json.loads((m.OUT / "losses.json").read_text())["batch"]
    assert m.chunk_list(batch["input_ids"]) == want["input_ids"], "not losses.json's batch"
    ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    shift = cm[:, 1:].bool()

    def token_logps(model):
        lg = model(input_ids=ids, attention_mask=am, use_cache=False).logits.float()
        return torch.log_softmax(lg[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    with torch.no_grad(), autocast:
        pol = token_logps(tr.model)
        with tr.model.disable_adapter():
            ref = token_logps(tr.model)
    tr.model.zero_grad(set_to_none=True)
    with autocast:
        loss = tr.compute_loss(tr.model, batch)
    loss.backward()
    grads = {k: v.to(torch.float32) for k, v in m.lora_grads(tr.model).items()}
    pol_sum = (pol * shift).sum(1)
    ref_sum = (ref * shift).sum(1)
    return {
        "policy_token_logps": [m.f32s(pol[i][shift[i]]) for i in range(ids.shape[0])],
        "policy_logps": m.f32s(pol_sum),
        "reference_logps": m.f32s(ref_sum),
        "loss": m.f32(float(loss.detach())),
    }, grads


def main():
    os.chdir(m.ROOT)
    out = {"trl_version": m.trl.__version__, "torch_version": torch.__version__,
           "rows": "[chosen.., rejected..] of losses.json's batch"}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        values, grads = half_values(dtype)
        out[name] = values
        path = m.OUT / ("%s_grads.safetensors" % name)
        st.save_file(grads, str(path), metadata={
            "description": "d/dLoRA of TRL %s DPO sigmoid loss (beta 0.1), model in %s; loss=%r"
                           % (m.trl.__version__, name, values["loss"])})
        path.chmod(0o644)
        print(name, "loss", values["loss"])
    m.dump(m.OUT / "half.json", out, indent=1)


if __name__ == "__main__":
    main()
