"""Probe: can a tiny model learn in-context QA on the synthetic world? (answer-only loss, no memory)

Usage: python scripts/probe_in_context_qa.py LAYERS LR MINUTES MAX_BIOS
Prints held-out in-context accuracy every 100 steps (batch 64, AdamW, 100-step warm-up, clip 1.0).
Findings are in docs/tinymodel.md.
"""
import json
import random
import sys
import time

import torch

from memllm import tinymodel as tm

torch.set_num_threads(2)
layers, lr, minutes, nbio = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
r = tm.Recipe(num_layers=layers)
world = tm.build_world(r); tok = tm.build_tokenizer(world, r); model = tm.build_model(r, tok)
people = world.people(2000, "train", 0); held = world.heldout_people(128, 1)
opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
rng = random.Random(0); t0 = time.time(); step = 0
def qa(batch):
    rows, labels = [], []
    for _ in range(batch):
        group = [rng.choice(people) for _ in range(rng.randint(1, nbio))]
        prompt, answer = world.question(rng.choice(group), rng.choice(world.attributes), rng)
        ids = tm.encode(tok, [" ".join(world.biography(p, rng) for p in group) + " " + prompt])[0]
        a = tm.encode(tok, [answer], bos=False)[0][0]
        rows.append(ids + [a]); labels.append([-100] * len(ids) + [a])
    return tm.pad(rows, tok.pad_token_id), tm.pad(labels, -100)
while time.time() - t0 < minutes * 60:
    warm = min(1.0, (step + 1) / 100)
    for g in opt.param_groups: g["lr"] = lr * warm
    ids, labels = qa(64)
    loss = model.lm(input_ids=ids, labels=labels).loss
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); step += 1
    if step % 100 == 0:
        with torch.no_grad():
            acc = tm.in_context_accuracy(model, world, tok, held, seed=step)
        print(json.dumps({"step": step, "min": round((time.time()-t0)/60, 1), "loss": round(loss.item(), 3), "heldout_in_context": acc}), flush=True)
