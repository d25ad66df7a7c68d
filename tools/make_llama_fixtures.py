#!/usr/bin/env python3
"""Generate the tiny Llama-family test fixtures under tests/fixtures/llama/.

Run by hand from the repository root:  python3 tools/make_llama_fixtures.py
Everything is seeded, so re-running reproduces the same files (the script
checks the BPE/SentencePiece trainers are deterministic by training twice).

What it makes
-------------
tests/fixtures/llama/
  tokenizer_fixture.json        byte-level BPE encode cases + rendered ChatML prompt
  <variant>/                    one tiny random HF checkpoint per variant:
      config.json generation_config.json model*.safetensors [index]
      tokenizer.json tokenizer_config.json expected.json
    gqa_f32            Llama, 4 q heads / 2 kv heads, untied, rope_theta 1e4, f32
    tied_bf16_sharded  Llama, MHA (4 kv heads), tied embeddings, bf16, 3 shards + index
    llama3_rope_f16    Llama, rope_theta 5e5 + llama3 rope scaling, f16.
                       original_max_position_embeddings is 64 (not 16): with head_dim 16 the
                       wavelengths are 6.3, 32.5, 167, ... so 64 exercises all three llama3
                       branches (kept / smoothed / divided by factor); 16 would never keep one.
    linear_rope        Llama, 1 kv head (MQA), linear rope scaling x2, f32;
                       config.json rewritten to the *other* (transformers-4) style
    bias               Llama with attention_bias=True and mlp_bias=True, f32
    qwen2              Qwen2ForCausalLM (q/k/v bias only), f32
  gguf/
    tiny-f32.gguf (+ .expected.json)     gqa_f32 converted like convert_hf_to_gguf.py
    tiny-mixed.gguf (+ .expected.json)   F32/F16/Q8_0/Q4_0/Q4_1/BF16 mix
    tiny-spm-vocab.gguf                  SentencePiece ("llama") vocab + the gqa_f32 tensors
                                         (stored F16, norms F32, to save space)
    tiny-spm-vocab.expected.json         SentencePiece encode cases
    tiny-spm.model                       the SentencePiece model itself (for inspection)

expected.json (per variant): "sequences" (3 seqs, lengths 11/7/16), "logprobs"
(float64 reference, see below), "logprobs_f32" (HF in float32), "logits_first"
(f64 logits rows at positions 0 and len-1 of sequence 0), "padded" (right-padded
batch with attention mask), "greedy" (6-token prompt, 12 greedy tokens).

Float64 reference: the checkpoint is loaded with dtype=float32 (bf16/f16 weights are
upcast exactly) and then .to(float64).  Stock transformers silently computes
RMSNorm, the attention softmax and the RoPE cos/sin in float32 even in a float64
model, so for the float64 run those three pieces are patched to stay in float64
(see hf_true_f64); the result is cross-checked against an independent plain-torch
float64 forward (ref_forward) to ~1e-10.  "logprobs_f32" is unpatched HF float32.

Versions used to generate the committed files:
  python 3.11.7, torch 2.15.0, transformers 5.23.0, tokenizers 0.23.3,
  safetensors 0.8.0, numpy 2.4.6, gguf 0.19.0, sentencepiece 0.2.3, protobuf 7.36.2 (for the
  HF sentencepiece conversion only).
transformers 5.x writes RoPE config as a nested "rope_parameters" object
({"rope_type", "rope_theta", "factor", ...}) and "dtype" instead of "torch_dtype".
linear_rope/config.json is rewritten to the transformers-4 style: top-level
"rope_theta" + "rope_scaling": {"type": "linear", "factor": 2.0} and "torch_dtype";
the script checks transformers reloads it with identical logits.

GGUF notes: tokenizer.ggml.pre = "gpt-2" (llama.cpp's name for the plain GPT-2
byte-level regex, which is exactly what the tiny BPE tokenizer uses; "smollm" would
additionally split digits individually).  ffn_down has ggml row length 176, not a
multiple of the 32-wide Q block, so in the quantized layers it is stored as F16.
BF16 writing is supported by gguf-py, so output.weight in tiny-mixed is BF16.
The SentencePiece vocab is trained with vocab_size 400 (not ~300) so that it has the
same size as the tiny-f32 tensors it is packaged with.

Other choices: config bos_token_id = 1 (<|im_start|>, the SmolLM2 convention) while the
tokenizer has bos_token null and add_bos_token false, so BOS is never added implicitly.
tokenizer_config.json keeps the chat template inline (transformers 5 would write a separate
chat_template.jinja) and uses tokenizer_class "PreTrainedTokenizerFast".
"""

import copy
import importlib.metadata
import io
import json
import math
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import gguf
import sentencepiece as spm
import tokenizers
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "llama"

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "She sells sea shells by the sea shore.",
    "The capital of Germany is Berlin, and the capital of Italy is Rome.",
    "Paris is famous for the Eiffel Tower and its many museums.",
    "How many legs does a spider have? A spider has eight legs.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The sun rises in the east and sets in the west.",
    "Please write a short poem about the ocean.",
    "The ocean is deep, the ocean is wide, and the waves roll in with the tide.",
    "Machine learning models learn patterns from data.",
    "A transformer uses attention to mix information between tokens.",
    "Rotary position embeddings rotate the query and key vectors.",
    "The model predicts the next token given all previous tokens.",
    "I would like a cup of coffee with milk, please.",
    "Can you tell me the time? It is half past three.",
    "My favourite colours are blue, green and yellow.",
    "There are seven days in a week and twelve months in a year.",
    "The cat sat on the mat and looked out of the window.",
    "Dogs are loyal animals that love to play outside.",
    "He opened the door, walked in, and sat down at the table.",
    "In 1969, astronauts landed on the Moon for the first time.",
    "The train leaves at 9:45 and arrives at 11:30.",
    "Two plus two equals four, and three times three is nine.",
    "The library is open from Monday to Friday.",
    "Reading books is a wonderful way to learn new things.",
    "The weather today is sunny with a light breeze.",
    "Tomorrow it will rain in the morning and clear up in the afternoon.",
    "Mount Everest is the highest mountain on Earth.",
    "The river flows through the valley towards the sea.",
    "What is your name? My name is Ada.",
    "Thank you very much for your help!",
    "You are a helpful assistant.",
    "Be brief.",
    "Answer the question in one sentence.",
    "The user asked a question and the assistant answered it.",
    "Hello, world! This is a small test of the tokenizer.",
    "Numbers like 42, 3.14 and 2024 appear in text too.",
    "Email me at test@example.com if you have questions.",
    "The price is $19.99, which is cheaper than last week.",
    "Fresh bread, cheese and fruit make a simple lunch.",
    "The children played in the park until the sun went down.",
    "Every morning she runs five kilometres along the river.",
    "The museum has paintings, sculptures and ancient coins.",
    "London is the capital of the United Kingdom.",
    "Madrid is the capital of Spain and Lisbon is the capital of Portugal.",
    "The moon orbits the Earth, and the Earth orbits the Sun.",
    "Light travels faster than sound.",
    "Plants need water, light and air to grow.",
    "The meeting was moved from Tuesday to Thursday.",
    "Could you summarize this paragraph in two sentences?",
    "Summaries should be short, clear and accurate.",
    "The recipe calls for two eggs, flour, sugar and butter.",
    "He said: \"I will be there at noon.\"",
    "Don't forget to close the window before you leave.",
    "It's a beautiful day, isn't it?",
    "The old man and the sea is a famous short novel.",
    "Computers store numbers as bits, zeros and ones.",
    "Good night, and see you tomorrow.",
    "The naive cafe near the station serves good tea.",
    "Tokyo is the capital of Japan.",
]

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # config bos = <|im_start|> (SmolLM2 convention)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BPE_VOCAB = 400
SPM_VOCAB = 400

COMMON = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    head_dim=16,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    initializer_range=0.2,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)
SEQ_LENS = [11, 7, 16]
GREEDY_PROMPT_LEN = 6
GREEDY_NEW = 12

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)


# --------------------------------------------------------------------------- json helpers
def f32s(a):
    """float32 values as their shortest float32 repr (parse as f32 to get them back exactly)."""
    return [float(str(np.float32(v))) for v in np.asarray(a, dtype=np.float32).reshape(-1)]


def f64s(a):
    return [float(v) for v in np.asarray(a, dtype=np.float64).reshape(-1)]


def dump(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")


# --------------------------------------------------------------------------- tokenizer
def train_bpe():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def hf_tokenizer(tok):
    t = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=COMMON["max_position_embeddings"],
    )
    t.chat_template = CHAT_TEMPLATE
    return t


def save_tokenizer(hf_tok, d):
    hf_tok.save_pretrained(d)
    # transformers 5 puts the template in chat_template.jinja; keep everything in
    # tokenizer_config.json (the older, still widely used layout) instead.
    jinja = Path(d) / "chat_template.jinja"
    if jinja.exists():
        jinja.unlink()
    for extra in ["special_tokens_map.json"]:
        p = Path(d) / extra
        if p.exists():
            p.unlink()
    cfg_path = Path(d) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(
        {
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "add_bos_token": False,
            "add_eos_token": False,
            "chat_template": CHAT_TEMPLATE,
            # transformers 5 writes "TokenizersBackend"; use the name both 4.x and 5.x understand
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
    )
    cfg.pop("backend", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


TOKENIZER_CASES = [
    "What is the capital of France? The capital of France is Paris.",
    "Hello world",
    "   leading spaces and  double  spaces ",
    "naïve café 東京",
    "Numbers 12345, 3.14 and symbols $%&*!",
    "line one\nline two\ttab",
    "<|im_start|>user\nHi there<|im_end|>",
]
CHAT_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
]


def make_tokenizer_fixture(hf_tok, tok):
    cases = []
    for text in TOKENIZER_CASES:
        ids = hf_tok.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text, add_special_tokens=False).ids
        assert hf_tok.decode(ids) == text, (hf_tok.decode(ids), text)
        cases.append({"text": text, "ids": ids})
    rendered = hf_tok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    chat_ids = hf_tok.encode(rendered, add_special_tokens=False)
    return {
        "vocab_size": tok.get_vocab_size(),
        "cases": cases,
        "chat_messages": CHAT_MESSAGES,
        "chat_rendered": rendered,
        "chat_ids": chat_ids,
    }


# --------------------------------------------------------------------------- float64 reference
def inv_freq_f64(rp, head_dim):
    theta = float(rp["rope_theta"])
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind == "default":
        pass
    elif kind == "linear":
        inv = inv / float(rp["factor"])
    elif kind == "llama3":
        factor = float(rp["factor"])
        lo, hi = float(rp["low_freq_factor"]), float(rp["high_freq_factor"])
        old = float(rp["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, smoothed, out)
    else:
        raise ValueError(kind)
    return torch.tensor(inv, dtype=torch.float64)


@contextmanager
def hf_true_f64():
    """Keep RMSNorm, softmax and RoPE in float64 for float64 HF models (stock HF upcasts to f32)."""
    import transformers.models.llama.modeling_llama as ml
    import transformers.models.qwen2.modeling_qwen2 as mq

    saved = []

    def patch(obj, name, new):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, new)

    def make_rms(orig):
        def fwd(self, x):
            if x.dtype != torch.float64:
                return orig(self, x)
            var = x.pow(2).mean(-1, keepdim=True)
            return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))

        return fwd

    def make_rope(orig):
        def fwd(self, x, position_ids):
            if x.dtype != torch.float64:
                return orig(self, x, position_ids)
            inv = inv_freq_f64(self.config.rope_parameters, self.config.head_dim).to(x.device)
            freqs = position_ids[..., None].to(torch.float64) * inv
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

        return fwd

    def make_eager(orig):
        def fwd(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
            if query.dtype != torch.float64:
                return orig(module, query, key, value, attention_mask, scaling, dropout=dropout, **kwargs)
            k = ml.repeat_kv(key, module.num_key_value_groups)
            v = ml.repeat_kv(value, module.num_key_value_groups)
            w = torch.matmul(query, k.transpose(2, 3)) * scaling
            if attention_mask is not None:
                w = w + attention_mask
            w = torch.softmax(w, dim=-1)
            return torch.matmul(w, v).transpose(1, 2).contiguous(), w

        return fwd

    patch(ml.LlamaRMSNorm, "forward", make_rms(ml.LlamaRMSNorm.forward))
    patch(mq.Qwen2RMSNorm, "forward", make_rms(mq.Qwen2RMSNorm.forward))
    patch(ml.LlamaRotaryEmbedding, "forward", make_rope(ml.LlamaRotaryEmbedding.forward))
    patch(mq.Qwen2RotaryEmbedding, "forward", make_rope(mq.Qwen2RotaryEmbedding.forward))
    patch(ml, "eager_attention_forward", make_eager(ml.eager_attention_forward))
    patch(mq, "eager_attention_forward", make_eager(mq.eager_attention_forward))
    try:
        yield
    finally:
        for obj, name, old in reversed(saved):
            setattr(obj, name, old)


def ref_forward(sd, cfg, ids):
    """Independent plain-torch float64 Llama/Qwen2 forward (one unpadded sequence) -> logits [T, V]."""
    g = lambda n: sd[n].to(torch.float64)
    b = lambda n: sd[n].to(torch.float64) if n in sd else 0.0
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    eps = cfg.rms_norm_eps
    T = len(ids)

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    inv = inv_freq_f64(cfg.rope_parameters, hd)
    freqs = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    cos = torch.cat([freqs.cos(), freqs.cos()], -1)
    sin = torch.cat([freqs.sin(), freqs.sin()], -1)

    def rope(x):  # [H, T, hd]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = g("model.embed_tokens.weight")[torch.tensor(ids)]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}."
        h = rms(x, g(p + "input_layernorm.weight"))
        q = h @ g(p + "self_attn.q_proj.weight").T + b(p + "self_attn.q_proj.bias")
        k = h @ g(p + "self_attn.k_proj.weight").T + b(p + "self_attn.k_proj.bias")
        v = h @ g(p + "self_attn.v_proj.weight").T + b(p + "self_attn.v_proj.bias")
        q = rope(q.view(T, nh, hd).transpose(0, 1))
        k = rope(k.view(T, nkv, hd).transpose(0, 1)).repeat_interleave(nh // nkv, 0)
        v = v.view(T, nkv, hd).transpose(0, 1).repeat_interleave(nh // nkv, 0)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd) + mask, -1) @ v
        a = a.transpose(0, 1).reshape(T, nh * hd)
        x = x + a @ g(p + "self_attn.o_proj.weight").T + b(p + "self_attn.o_proj.bias")
        h = rms(x, g(p + "post_attention_layernorm.weight"))
        gate = h @ g(p + "mlp.gate_proj.weight").T + b(p + "mlp.gate_proj.bias")
        up = h @ g(p + "mlp.up_proj.weight").T + b(p + "mlp.up_proj.bias")
        x = x + (F.silu(gate) * up) @ g(p + "mlp.down_proj.weight").T + b(p + "mlp.down_proj.bias")
    x = rms(x, g("model.norm.weight"))
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return x @ head.to(torch.float64).T


# --------------------------------------------------------------------------- model helpers
def load_pair(d):
    m32 = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    m64 = copy.deepcopy(m32).to(torch.float64).eval()
    return m32, m64


@torch.no_grad()
def seq_logprobs(model, ids):
    logits = model(torch.tensor([ids])).logits[0]
    lp = torch.log_softmax(logits, -1)
    return [lp[t, ids[t + 1]].item() for t in range(len(ids) - 1)], logits


@torch.no_grad()
def compute_expected(d, seed, sequences=None, model_override=None):
    m32, m64 = load_pair(d) if model_override is None else model_override
    V = m32.config.vocab_size
    rng = np.random.default_rng(seed)
    if sequences is None:
        sequences = [rng.integers(3, V, size=n).tolist() for n in SEQ_LENS]
    sd32 = {k: v for k, v in m32.state_dict().items()}

    lp32 = [seq_logprobs(m32, s)[0] for s in sequences]
    with hf_true_f64():
        res64 = [seq_logprobs(m64, s) for s in sequences]
    lp64 = [r[0] for r in res64]
    logits0 = res64[0][1]

    # cross-checks: independent f64 forward, and f32 vs f64
    for s, (lp, logits) in zip(sequences, res64):
        ref = ref_forward(sd32, m32.config, s)
        err = (ref - logits).abs().max().item()
        assert err < 1e-9, f"{d}: HF f64 vs ref_forward max err {err}"
    err32 = max(abs(a - b) for x, y in zip(lp32, lp64) for a, b in zip(x, y))
    assert err32 < 1e-3, f"{d}: f32 vs f64 logprob err {err32}"

    # right-padded batch with attention mask
    L = max(len(s) for s in sequences)
    input_ids = [s + [PAD_ID] * (L - len(s)) for s in sequences]
    attn = [[1] * len(s) + [0] * (L - len(s)) for s in sequences]

    def padded_lp(model):
        logits = model(torch.tensor(input_ids), attention_mask=torch.tensor(attn)).logits
        lp = torch.log_softmax(logits, -1)
        return [[lp[i, t, s[t + 1]].item() for t in range(len(s) - 1)] for i, s in enumerate(sequences)]

    with hf_true_f64():
        pad64 = padded_lp(m64)
    pad32 = padded_lp(m32)
    errp = max(abs(a - b) for x, y in zip(pad64, lp64) for a, b in zip(x, y))
    assert errp < 1e-9, f"{d}: padded vs unpadded f64 err {errp}"

    out = {
        "sequences": sequences,
        "logprobs": lp64,
        "logprobs_f32": lp32,
        "logits_first": [f64s(logits0[0]), f64s(logits0[len(sequences[0]) - 1])],
        "padded": {
            "input_ids": input_ids,
            "attention_mask": attn,
            "logprobs": pad64,
            "logprobs_f32": pad32,
        },
    }
    if model_override is None:
        out["greedy"] = greedy_fixture(m32, m64, seed)
    return out


@torch.no_grad()
def greedy_loop(model, prompt, f64):
    ids = list(prompt)
    margins = []
    for _ in range(GREEDY_NEW):
        if f64:
            with hf_true_f64():
                logits = model(torch.tensor([ids])).logits[0, -1]
        else:
            logits = model(torch.tensor([ids])).logits[0, -1]
        top = torch.topk(logits, 2).values
        margins.append((top[0] - top[1]).item())
        ids.append(int(logits.argmax()))
    return ids[len(prompt):], min(margins)


@torch.no_grad()
def greedy_fixture(m32, m64, seed):
    V = m32.config.vocab_size
    # Pick a prompt whose greedy continuation is the same in f32 and f64 and never has a
    # near-tie (top-2 logit gap >= 1e-3 at every step), so the test is robust to rounding.
    for attempt in range(100):
        rng = np.random.default_rng(seed * 1000 + 7 + attempt)
        prompt = rng.integers(3, V, size=GREEDY_PROMPT_LEN).tolist()
        out32, _ = greedy_loop(m32, prompt, False)
        out64, margin = greedy_loop(m64, prompt, True)
        if out32 == out64 and margin >= 1e-3:
            break
    else:
        raise RuntimeError("no robust greedy prompt found")
    # and HF generate() agrees (eos disabled so it never stops early)
    gc = GenerationConfig(do_sample=False, max_new_tokens=GREEDY_NEW, eos_token_id=None, pad_token_id=PAD_ID)
    saved = m32.generation_config
    m32.generation_config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=PAD_ID)
    gen = m32.generate(torch.tensor([prompt]), generation_config=gc)[0, len(prompt):].tolist()
    m32.generation_config = saved
    assert gen == out32, (gen, out32)
    return {"prompt": prompt, "max_new_tokens": GREEDY_NEW, "output": out32, "prompt_attempt": attempt,
            "min_top2_logit_gap_f64": margin}


def randomize(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif n.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))


VARIANTS = [
    # name, seed, model class, config class, extra config, save dtype, max_shard_size
    ("gqa_f32", 1, LlamaForCausalLM, LlamaConfig,
     dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0), torch.float32, None),
    ("tied_bf16_sharded", 2, LlamaForCausalLM, LlamaConfig,
     dict(num_key_value_heads=4, tie_word_embeddings=True, rope_theta=10000.0), torch.bfloat16, "100KB"),
    ("llama3_rope_f16", 3, LlamaForCausalLM, LlamaConfig,
     dict(num_key_value_heads=2, tie_word_embeddings=False,
          rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
     torch.float16, None),
    ("linear_rope", 4, LlamaForCausalLM, LlamaConfig,
     dict(num_key_value_heads=1, tie_word_embeddings=False,
          rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
     torch.float32, None),
    ("bias", 5, LlamaForCausalLM, LlamaConfig,
     dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0, attention_bias=True, mlp_bias=True),
     torch.float32, None),
    ("qwen2", 6, Qwen2ForCausalLM, Qwen2Config,
     dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0, use_sliding_window=False),
     torch.float32, None),
]


def make_variant(name, seed, mcls, ccls, extra, dtype, shard, hf_tok, vocab):
    d = OUT / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    torch.manual_seed(seed)
    kw = dict(COMMON, vocab_size=vocab, **extra)
    if "rope_parameters" not in kw and "rope_theta" in kw:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
    cfg = ccls(**kw)
    model = mcls(cfg).eval()
    randomize(model)
    model = model.to(dtype)
    save_kw = {}
    if shard:
        save_kw["max_shard_size"] = shard
    model.save_pretrained(d, **save_kw)
    save_tokenizer(hf_tok, d)

    if name == "linear_rope":
        before = compute_expected(d, seed)
        to_v4_style_config(d)
        after = compute_expected(d, seed)
        assert before == after, "linear_rope: v4-style config changed the results"
        exp = after
    else:
        exp = compute_expected(d, seed)
    exp["source"] = {"variant": name, "seed": seed, "saved_dtype": str(dtype).replace("torch.", "")}
    dump(d / "expected.json", exp)
    return d


def to_v4_style_config(d):
    p = d / "config.json"
    cfg = json.loads(p.read_text())
    rp = cfg.pop("rope_parameters")
    scaling = {k: v for k, v in rp.items() if k not in ("rope_type", "rope_theta")}
    cfg["rope_theta"] = rp["rope_theta"]
    cfg["rope_scaling"] = {"type": rp["rope_type"], **scaling}
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    reloaded = LlamaConfig.from_pretrained(d)
    assert reloaded.rope_parameters["rope_type"] == rp["rope_type"], reloaded.rope_parameters
    assert reloaded.rope_parameters["factor"] == rp["factor"], reloaded.rope_parameters
    assert reloaded.rope_parameters["rope_theta"] == rp["rope_theta"], reloaded.rope_parameters


# --------------------------------------------------------------------------- GGUF
def gguf_name(n):
    if n == "model.embed_tokens.weight":
        return "token_embd.weight"
    if n == "model.norm.weight":
        return "output_norm.weight"
    if n == "lm_head.weight":
        return "output.weight"
    parts = n.split(".")
    assert parts[:2] == ["model", "layers"], n
    sub = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }[".".join(parts[3:])]
    return f"blk.{parts[2]}.{sub}"


def permute(w, n_head, n_head_kv):
    """Exactly convert_hf_to_gguf.py's LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


QT = gguf.GGMLQuantizationType


def add_llama_hparams(w, cfg, file_type):
    w.add_name("prefer tiny llama fixture")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_bpe_vocab(w, tok_json):
    vocab = tok_json["model"]["vocab"]
    for t in tok_json["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    assert all(t is not None for t in tokens)
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok_json["model"]["merges"]]
    types = [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_pad_token_id(PAD_ID)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


def add_spm_vocab(w, sp):
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            t = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            t = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            t = gguf.TokenType.BYTE
        else:
            t = gguf.TokenType.NORMAL
        types.append(t)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def write_gguf(path, sd, cfg, qtype_of, file_type, vocab_fn):
    w = gguf.GGUFWriter(str(path), "llama")
    add_llama_hparams(w, cfg, file_type)
    vocab_fn(w)
    types = {}
    for hf_name, t in sd.items():
        name = gguf_name(hf_name)
        data = t.to(torch.float32).numpy()
        if name.endswith("attn_q.weight"):
            data = permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            data = permute(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        qt = qtype_of(name)
        types[name] = qt.name
        if qt == QT.F32:
            w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
        elif qt == QT.F16:
            w.add_tensor(name, np.ascontiguousarray(data.astype(np.float16)))
        else:
            w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(data), qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


def read_gguf_as_hf(path, cfg):
    """Read a GGUF back (gguf-py reader), dequantize and undo the q/k permutation -> HF state dict."""
    r = gguf.GGUFReader(str(path))
    inv = {gguf_name(n): n for n in HF_NAMES(cfg)}
    sd = {}
    for t in r.tensors:
        hf_shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(hf_shape)
        if t.name.endswith("attn_q.weight"):
            data = unpermute(data, cfg.num_attention_heads)
        elif t.name.endswith("attn_k.weight"):
            data = unpermute(data, cfg.num_key_value_heads)
        sd[inv[t.name]] = torch.from_numpy(np.ascontiguousarray(data))
    return sd, r


def HF_NAMES(cfg):
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for l in range(cfg.num_hidden_layers):
        for s in ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]:
            names.append(f"model.layers.{l}.{s}.weight")
    return names


def mixed_qtype(name):
    if name.endswith("norm.weight"):
        return QT.F32
    if name == "token_embd.weight":
        return QT.F16
    if name == "output.weight":
        return QT.BF16
    if name.endswith("ffn_down.weight"):
        return QT.F16  # row length 176 is not a multiple of the 32-element quant block
    if name.startswith("blk.0.attn_"):
        return QT.Q8_0
    if name.startswith("blk.0.ffn_"):
        return QT.Q4_0
    if name.startswith("blk.1."):
        return QT.Q4_1
    raise ValueError(name)


SPM_CASES = [
    "The capital of France is Paris.",
    "Hello world",
    " leading space",
    "multiple   spaces  and a trailing space ",
    "naïve café 東京",
    "price: € 5 🙂",
    "line one\nline two",
    "12345 apples",
]


def train_spm():
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=buf,
        model_type="bpe",
        vocab_size=SPM_VOCAB,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def make_gguf(gqa_dir, gqa_expected):
    gd = OUT / "gguf"
    if gd.exists():
        shutil.rmtree(gd)
    gd.mkdir(parents=True)
    m32 = AutoModelForCausalLM.from_pretrained(gqa_dir, dtype=torch.float32, attn_implementation="eager").eval()
    cfg = m32.config
    sd = {n: m32.state_dict()[n] for n in HF_NAMES(cfg)}
    tok_json = json.loads((gqa_dir / "tokenizer.json").read_text())
    bpe_vocab = lambda w: add_bpe_vocab(w, copy.deepcopy(tok_json))
    seqs = gqa_expected["sequences"]

    def expected_for(path, types, chosen):
        dq, _ = read_gguf_as_hf(path, cfg)
        m = AutoModelForCausalLM.from_pretrained(gqa_dir, dtype=torch.float32, attn_implementation="eager").eval()
        m.load_state_dict(dq, strict=True)
        exp = compute_expected(gqa_dir, 1, sequences=seqs,
                               model_override=(m, copy.deepcopy(m).to(torch.float64).eval()))
        exp = {"sequences": exp["sequences"], "logprobs": exp["logprobs"], "logprobs_f32": exp["logprobs_f32"]}
        exp["tensor_types"] = types
        exp["dequantized"] = {n: f32s(dq[n]) for n in chosen}
        exp["dequantized_shapes"] = {n: list(dq[n].shape) for n in chosen}
        return exp, dq

    # --- tiny-f32.gguf
    p = gd / "tiny-f32.gguf"
    types = write_gguf(p, sd, cfg, lambda n: QT.F32, gguf.LlamaFileType.ALL_F32, bpe_vocab)
    chosen = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"]
    exp, dq = expected_for(p, types, chosen)
    for n in sd:  # F32 round trip must be exact (checks permute/unpermute)
        assert torch.equal(dq[n], sd[n]), n
    assert exp["logprobs"] == gqa_expected["logprobs"]
    dump(gd / "tiny-f32.gguf.expected.json", exp)

    # --- tiny-mixed.gguf
    p = gd / "tiny-mixed.gguf"
    types = write_gguf(p, sd, cfg, mixed_qtype, gguf.LlamaFileType.MOSTLY_Q4_0, bpe_vocab)
    chosen = ["model.layers.0.self_attn.k_proj.weight",  # Q8_0 (permuted)
              "model.layers.0.mlp.gate_proj.weight",     # Q4_0
              "model.layers.1.self_attn.q_proj.weight"]  # Q4_1 (permuted)
    exp, dq = expected_for(p, types, chosen)
    assert [types[gguf_name(n)] for n in chosen] == ["Q8_0", "Q4_0", "Q4_1"]
    for n in sd:
        err = (dq[n] - sd[n]).abs().max().item()
        assert err < 0.2, (n, err)
    dump(gd / "tiny-mixed.gguf.expected.json", exp)

    # --- tiny-spm-vocab.gguf
    proto = train_spm()
    assert proto == train_spm(), "sentencepiece training is not deterministic"
    (gd / "tiny-spm.model").write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    assert sp.get_piece_size() == cfg.vocab_size
    # tensors stored as F16 (F32 for norms) to keep the fixture small; only the vocab matters here
    write_gguf(gd / "tiny-spm-vocab.gguf", sd, cfg, lambda n: QT.F32 if n.endswith("norm.weight") else QT.F16,
               gguf.LlamaFileType.MOSTLY_F16,
               lambda w: add_spm_vocab(w, sp))
    gguf.GGUFReader(str(gd / "tiny-spm-vocab.gguf"))  # must parse

    with tempfile.TemporaryDirectory() as td:
        (Path(td) / "tokenizer.model").write_bytes(proto)
        hf = transformers.LlamaTokenizer.from_pretrained(td, legacy=False, add_bos_token=True, add_eos_token=False)
    cases = []
    for text in SPM_CASES:
        ids = [sp.bos_id()] + sp.encode(text)
        hf_ids = hf.encode(text)
        case = {"text": text, "ids": ids, "pieces": [sp.id_to_piece(i) for i in ids]}
        if hf_ids != ids:
            case["hf_ids"] = hf_ids
        assert sp.decode(ids[1:]) == text
        cases.append(case)
    dump(gd / "tiny-spm-vocab.expected.json", {
        "note": "ids = [bos] + sentencepiece.encode(text) (what llama.cpp's SPM tokenizer produces). "
                "hf_ids is present only where transformers' LlamaTokenizer(legacy=False) disagrees "
                "(its Metaspace prepend_scheme='first' does not add the dummy prefix when the text "
                "already starts with a space).",
        "bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "unk_id": sp.unk_id(),
        "cases": cases,
    })


# --------------------------------------------------------------------------- main
def main():
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, "
          f"gguf {importlib.metadata.version('gguf')}")
    OUT.mkdir(parents=True, exist_ok=True)
    tok = train_bpe()
    assert tok.to_str() == train_bpe().to_str(), "BPE training is not deterministic"
    vocab = tok.get_vocab_size()
    assert tok.token_to_id("<|endoftext|>") == PAD_ID and tok.token_to_id("<|im_start|>") == BOS_ID
    assert tok.token_to_id("<|im_end|>") == EOS_ID
    hf_tok = hf_tokenizer(tok)

    with tempfile.TemporaryDirectory() as td:
        save_tokenizer(hf_tok, td)
        reloaded = AutoTokenizer.from_pretrained(td)
        fixture = make_tokenizer_fixture(reloaded, tok)
        assert fixture == make_tokenizer_fixture(hf_tok, tok)
    dump(OUT / "tokenizer_fixture.json", fixture)

    expected = {}
    for name, seed, mcls, ccls, extra, dtype, shard in VARIANTS:
        print("variant", name)
        d = make_variant(name, seed, mcls, ccls, extra, dtype, shard, hf_tok, vocab)
        expected[name] = json.loads((d / "expected.json").read_text())
    print("gguf")
    make_gguf(OUT / "gqa_f32", expected["gqa_f32"])

    total = 0
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"{p.stat().st_size:>9}  {p.relative_to(ROOT)}")
    print(f"{total:>9}  total")


if __name__ == "__main__":
    main()
