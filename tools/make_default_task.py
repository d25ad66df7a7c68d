"""The preference data of `prefer train`'s built-in job: conversational pairs in TRL's format where the
chosen answer is a helpful, polite one and the rejected answer a curt refusal.

Run by hand: python tools/make_default_task.py
Writes crates/prefer-cli/assets/default/{train,eval}.jsonl. The eval questions and answer phrasings
are held out from training, so held-out accuracy measures a learned preference, not memorised pairs.
"""
import json
import os
import random

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "prefer-cli", "assets", "default")

topics = ["boil an egg", "tie a knot", "plant a tree", "fix a bike", "bake bread", "learn Rust",
          "write a poem", "clean a pan", "fold a shirt", "start a fire", "paint a wall", "wash a car",
          "sort a list", "make tea", "read a map", "sew a button", "train a model", "brew coffee",
          "build a shelf", "grow tomatoes", "cook rice", "save money", "find a job", "sleep better",
          "run a mile", "tune a guitar", "draw a cat", "pack a bag", "send a letter", "swim faster"]
asks = ["How do I {}?", "Can you tell me how to {}?", "What is the best way to {}?",
        "Please explain how to {}.", "I want to {}. Where do I start?", "Could you help me {}?"]
polite = ["Sure, happy to help! First, gather what you need, then go step by step.",
          "Of course. Start small, take your time, and check each step as you go.",
          "Great question! Begin with the basics and I can walk you through the rest.",
          "Glad you asked. Here is a simple plan: prepare, practise, then review.",
          "Thank you for asking! The easiest way is to follow a short checklist.",
          "Happy to explain. Start with a clear goal and build up from there.",
          "Sure thing! Break it into small steps and you will get it done.",
          "With pleasure. Prepare first, then work through it calmly."]
rude = ["No. Figure it out yourself.", "Not my problem.", "Why would I tell you that?",
        "Go away.", "Ask someone else.", "I do not care.", "That is a silly question.",
        "Stop asking me things."]

rng = random.Random(2026)
held_topics = set(rng.sample(topics, 8))
held_polite, held_rude = polite[-2:], rude[-2:]


def pairs(n, use_held):
    out = []
    pool = [t for t in topics if (t in held_topics) == use_held]
    p = held_polite if use_held else polite[:-2]
    r = held_rude if use_held else rude[:-2]
    for _ in range(n):
        q = rng.choice(asks).format(rng.choice(pool))
        out.append({
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": rng.choice(p)}],
            "rejected": [{"role": "assistant", "content": rng.choice(r)}],
        })
    return out


os.makedirs(OUT, exist_ok=True)
for name, rows in [("train.jsonl", pairs(192, False)), ("eval.jsonl", pairs(48, True))]:
    with open(os.path.join(OUT, name), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
print("wrote", OUT)
