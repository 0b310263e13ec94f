"""Our own tiny memory models, trained from scratch on CPU: the seeded recipe.

    python -m memllm.tinymodel --out DIR                      # both: DIR/memoryllm, then DIR/mplus
    python -m memllm.tinymodel --out DIR --kind memoryllm     # stages 1-2 only
    python -m memllm.tinymodel --out DIR --kind mplus --init MEMORYLLM_DIR   # stage 3 only

Read top to bottom:

1. ``build_tokenizer``: a world tokenizer (every attribute value is one token).
2. ``build_model``: a tiny Llama memory model (d 128, 4 layers, K 32, N 256: 8 biographies of at
   most 31 tokens fit in short-term memory; M+ adds R = 2 blocks retrieved from long-term memory).
3. Stage 1 (``stage1``, ``lm_step``): language modelling on a fixed world of people plus the
   answer-only loss of in-context QA rows, one biography per question until that is solved, then 1-3
   (a memory model cannot learn to read answers from memory before it can read them from context).
4. Stage 2 (``memory_stage``, ``memory_step``): memory training on fresh people every step (never the
   same person twice, so facts cannot be learned into the weights): inject a biography into a per-row
   memory, then 0..max_distractors distractor injections (half of them other people's biographies),
   then ask one question and take the loss on the answer token; gradients flow through every
   injection. Every ``replay_every``-th step is a stage-1 step (in-context replay). An EMA of the
   weights is what is evaluated and saved.
5. Stage 3, M+ (``train_mplus``): the MemoryLLM model plus a retriever (``mplus_from``), trained the
   same way with 0..mplus_max_distractors distractors, every row reading its long-term memory
   (``memllm.mplus.RowLTM``, exactly as inference does) and the retriever loss on the biography's
   long-term vectors.
6. ``checkpoint.save`` of the EMA weights with the tokenizer and ``recipe.json`` (the recipe, the
   stage summaries, the evaluation history); ``memllm eval retention`` measures them.

Everything random is derived from ``--seed``: the world, the tokenizer, the data streams, the
initialisation and the memory drops. The budgets are wall-clock minutes (``--minutes``,
``--mplus-minutes``), so a faster machine trains more steps; thread scheduling can also change float
rounding. The shipped weights' step counts are in their ``recipe.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from memllm.checkpoint import load, save
from memllm.inject import delta_memory
from memllm.model import MemoryModel
from memllm.mplus import RowLTM, drop_to_ltm
from memllm.retriever import layer_inputs, retriever_loss
from memllm.tiny import random_model
from memllm.tokenizer import train_world_tokenizer
from memllm.train import write, write_docs
from memllm.world import World, WorldConfig


@dataclass
class Recipe:
    """Everything that fixes a tiny model; the defaults are the shipped recipe."""

    kind: str = "both"  # memoryllm | mplus (from `init`) | both
    init: str = ""  # kind mplus: the trained MemoryLLM tiny model to start from
    seed: int = 0
    minutes: float = 80.0  # MemoryLLM wall-clock budget (stages 1-2)
    vocab_size: int = 1024
    tokenizer_docs: int = 10_000
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 344
    num_tokens: int = 32  # K
    stm_blocks: int = 8  # N = stm_blocks * K
    ltm_blocks: int = 2  # M+ only: R = ltm_blocks * K
    # stage 1
    stage1_people: int = 2000
    stage1_batch: int = 64
    stage1_lr: float = 2e-3
    warmup_steps: int = 100
    curriculum_target: float = 0.9  # one biography per question until in-context accuracy reaches this
    stage1_target: float = 0.95  # in-context QA accuracy (1-3 biographies) that ends stage 1
    stage1_share: float = 0.35  # at most this share of the time budget
    # stage 2
    batch: int = 32
    lr: float = 1e-3
    max_distractors: int = 8
    bio_distractors: float = 0.5  # share of distractors that are other people's biographies
    replay_every: int = 4
    ema: float = 0.99
    eval_every: int = 100
    eval_people: int = 64
    threads: int = 2
    # M+ (stage 3, from the trained MemoryLLM model)
    mplus_minutes: float = 40.0
    mplus_lr: float = 5e-4
    mplus_max_distractors: int = 32  # 4x the short-term capacity in biographies
    retriever_weight: float = 1.0

    @property
    def pool_size(self) -> int:
        return self.stm_blocks * self.num_tokens


# ---- 1, 2: tokenizer and model --------------------------------------------------------------------


def build_world(recipe: Recipe) -> World:
    return World(WorldConfig(seed=recipe.seed))


def build_tokenizer(world: World, recipe: Recipe):
    return train_world_tokenizer(world, vocab_size=recipe.vocab_size, seed=recipe.seed,
                                 n_docs=recipe.tokenizer_docs)


def build_model(recipe: Recipe, tokenizer) -> MemoryModel:
    """A randomly initialised tiny Llama memory model with the world tokenizer; initialised pool.

    M+ adds R = ltm_blocks * K retrieved slots and the retriever (query/key projectors, selector dim
    32). Its long-term memory merges at every update and never decays: the tiny model's whole history
    stays retrievable, and training reads it exactly as inference does (`memllm.mplus.RowLTM`)."""
    mplus = recipe.kind == "mplus"
    return random_model(
        num_layers=recipe.num_layers, hidden_size=recipe.hidden_size, num_heads=recipe.num_heads,
        num_kv_heads=recipe.num_heads, intermediate_size=recipe.intermediate_size, num_tokens=recipe.num_tokens,
        num_blocks=recipe.stm_blocks + (recipe.ltm_blocks if mplus else 0),
        kind=recipe.kind, num_ltm_blocks=recipe.ltm_blocks if mplus else 0,
        max_position_embeddings=1024, seed=recipe.seed, tokenizer=tokenizer, selector_hidden_dim=32,
        update_ltm_frequency=1, decay_frequency=0.0, add_encoder_retriever=False,
    ).train()


def mplus_from(memoryllm: MemoryModel, recipe: Recipe) -> MemoryModel:
    """An M+ model that starts from a trained MemoryLLM model (as M+ starts from MemoryLLM-8B): every
    MemoryLLM weight copied, the retriever projectors new."""
    model = build_model(dataclasses.replace(recipe, kind="mplus"), memoryllm.tokenizer)
    missing, unexpected = model.load_state_dict(memoryllm.state_dict(), strict=False)
    new = [k for k in missing if not any(p in k for p in ("query_proj", "key_proj"))]
    if new or unexpected:
        raise ValueError(f"MemoryLLM -> M+ weight mismatch: missing {new}, unexpected {unexpected}")
    return model.train()


# ---- data -----------------------------------------------------------------------------------------


def encode(tokenizer, texts: list[str], bos: bool = True) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=bos)["input_ids"] for t in texts]


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    T = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (T - len(r)) for r in rows], dtype=torch.long)


def lm_batch(world: World, tokenizer, people, rng: random.Random, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-1 documents (biographies, in-context QA, distractors) about ``people``: ids, labels."""
    docs = list(world.corpus(batch, seed=rng.randrange(1 << 30), people=people))
    rows = encode(tokenizer, docs)
    ids = pad(rows, tokenizer.pad_token_id)
    labels = pad(rows, -100)
    return ids, labels


def qa_batch(world: World, tokenizer, people, rng: random.Random, batch: int,
             max_bios: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """In-context QA rows: 1..max_bios biographies then a question about one of them; the loss is on
    the answer token alone (in corpus documents answers are ~2% of the tokens: too weak a signal)."""
    rows, labels = [], []
    for _ in range(batch):
        group = [rng.choice(people) for _ in range(rng.randint(1, max_bios))]
        prompt, answer = world.question(rng.choice(group), rng.choice(world.attributes), rng)
        context = " ".join(world.biography(p, rng) for p in group)
        ids = encode(tokenizer, [context + " " + prompt])[0]
        answer_id = encode(tokenizer, [answer], bos=False)[0][0]
        rows.append(ids + [answer_id])
        labels.append([-100] * len(ids) + [answer_id])
    return pad(rows, tokenizer.pad_token_id), pad(labels, -100)


def qa_rows(world: World, tokenizer, people, rng: random.Random, in_context: bool) -> tuple[list[list[int]], list[int]]:
    """One question per person (random attribute): prompt ids (answer excluded) and answer token id.
    ``in_context``: the biography precedes the question (with <bos>); else the bare question."""
    prompts, answers = [], []
    for person in people:
        prompt, answer = world.question(person, rng.choice(world.attributes), rng)
        if in_context:
            ids = encode(tokenizer, [world.biography(person, rng) + " " + prompt])[0]
        else:
            ids = encode(tokenizer, [prompt], bos=False)[0]
        prompts.append(ids)
        answers.append(encode(tokenizer, [answer], bos=False)[0][0])
    return prompts, answers


@dataclass
class MemoryBatch:
    bios: list[list[int]]  # B biographies (no <bos>, as `model.inject` encodes text)
    distractors: list[list[list[int]]]  # n_distractors lists of B distractors
    questions: torch.Tensor  # [B, T] prompt + answer, right-padded
    labels: torch.Tensor  # [B, T] -100 except the answer token
    kept: list[torch.Tensor]  # per injection [B, L, N - K] surviving rows


def memory_batch(world: World, tokenizer, stream, rng: random.Random, batch: int, n_distractors: int,
                 num_layers: int, N: int, K: int, bio_distractors: float = 0.0) -> MemoryBatch:
    """Row b: person b's biography, then n_distractors texts (a share ``bio_distractors`` of them
    other people's biographies, so that reading must pick the right person), then a question."""
    people = [next(stream) for _ in range(batch)]
    bios = encode(tokenizer, [world.biography(p, rng) for p in people], bos=False)

    def distractor() -> str:
        if rng.random() < bio_distractors:
            return world.biography(next(stream), rng)
        return world.distractor(rng)

    distractors = [encode(tokenizer, [distractor() for _ in people], bos=False) for _ in range(n_distractors)]
    prompts, answers = qa_rows(world, tokenizer, people, rng, in_context=False)
    rows = [p + [a] for p, a in zip(prompts, answers)]
    questions = pad(rows, tokenizer.pad_token_id)
    labels = torch.full_like(questions, -100)
    for b, p in enumerate(prompts):
        labels[b, len(p)] = answers[b]
    g = torch.Generator().manual_seed(rng.randrange(1 << 62))
    kept = [torch.rand(batch, num_layers, N, generator=g).argsort(-1)[..., : N - K].sort(-1).values
            for _ in range(1 + n_distractors)]
    return MemoryBatch(bios, distractors, questions, labels, kept)


# ---- per-row memories -----------------------------------------------------------------------------


def inject_rows(model: MemoryModel, pools: torch.Tensor, rows: list[list[int]], kept: torch.Tensor,
                grad: bool = True) -> torch.Tensor:
    """Write one context per row into pools [B, L, N, d]. The write keeps the graph of the surviving
    rows; `grad=False` computes the new rows without one (cheap distractors)."""
    ids = pad(rows, 0)
    mask = pad([[1] * len(r) for r in rows], 0)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        delta = delta_memory(model, pools, ids, mask)
    return write(pools, delta, kept)


def start_pools(model: MemoryModel, batch: int) -> torch.Tensor:
    return model.initial_pool.detach().unsqueeze(0).expand(batch, -1, -1, -1).clone()


def memory_loss(model: MemoryModel, mb: MemoryBatch, grad_distractors: bool = True,
                retriever_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, accuracy of the argmax answer, retriever statistics or None) after the biography and the
    distractor injections. The loss is on the answer token (plus, for M+, retriever_weight times the
    retriever loss whose positives are the biography's vectors in long-term memory)."""
    B = len(mb.bios)
    pools = start_pools(model, B)
    mplus = model.config.kind == "mplus"
    if mplus:  # long-term memory per row, and which injection wrote each vector (0: the biography)
        L, N = pools.shape[1:3]
        ltm, ages = RowLTM.empty(pools), torch.zeros(B, L, N, dtype=torch.long)
        docs = torch.full((B, L, N), -1, dtype=torch.long)
    for i, rows in enumerate([mb.bios, *mb.distractors]):
        if mplus:
            ltm, ages = drop_to_ltm(ltm, pools, ages, mb.kept[i], docs)
            docs = write_docs(docs, torch.full((B,), i), mb.kept[i])
        pools = inject_rows(model, pools, rows, mb.kept[i], grad=i == 0 or grad_distractors)
    captured: dict[int, torch.Tensor] = {}
    if mplus:
        q_mask = (mb.labels == -100) & (mb.questions != model.tokenizer.pad_token_id)
        with layer_inputs(model, captured, mb.questions.shape[1]):
            logits = model.forward_pools(mb.questions, pools, ltm=ltm, attention_mask=q_mask.long()).logits[:, :-1]
    else:
        logits = model.forward_pools(mb.questions, pools).logits[:, :-1]
    target = mb.labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
    mask = target != -100
    acc = (logits.argmax(-1)[mask] == target[mask]).float().mean()
    stats = None
    if mplus and ltm.size:
        r_loss, stats = retriever_loss(model, captured, ltm.vectors, ltm.docs == 0)
        loss = loss + retriever_weight * r_loss
    return loss, acc, stats


# ---- evaluation during training -------------------------------------------------------------------


@torch.no_grad()
def in_context_accuracy(model: MemoryModel, world: World, tokenizer, people, seed: int) -> float:
    rng = random.Random(seed)
    prompts, answers = qa_rows(world, tokenizer, people, rng, in_context=True)
    ids = pad(prompts, tokenizer.pad_token_id)
    logits = model.lm(ids).logits
    last = torch.tensor([len(p) - 1 for p in prompts])
    pred = logits[torch.arange(len(prompts)), last].argmax(-1)
    return (pred == torch.tensor(answers)).float().mean().item()


@torch.no_grad()
def recall_accuracy(model: MemoryModel, world: World, tokenizer, people, n_distractors: int, seed: int) -> float:
    """Held-out recall from memory after n distractors (argmax of the answer token)."""
    rng = random.Random(seed)
    stream = iter(people)
    mb = memory_batch(world, tokenizer, stream, rng, len(people), n_distractors,
                      model.num_layers, model.config.num_memory_tokens, model.config.num_tokens)
    return memory_loss(model, mb)[1].item()


# ---- training -------------------------------------------------------------------------------------


def lm_step(model: MemoryModel, opt, world, tokenizer, people, rng, batch: int, max_bios: int = 3) -> float:
    """Language modelling on corpus documents (a quarter batch) plus the answer-only loss of
    in-context QA rows."""
    ids, labels = lm_batch(world, tokenizer, people, rng, max(1, batch // 4))
    loss = model.lm(ids, labels=labels).loss
    ids, labels = qa_batch(world, tokenizer, people, rng, batch, max_bios)
    loss = loss + model.lm(ids, labels=labels).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def memory_step(model: MemoryModel, opt, world, tokenizer, stream, rng, recipe: Recipe
                ) -> tuple[float, float, torch.Tensor | None]:
    """One memory-training step: MemoryLLM 0..max_distractors distractors with the gradient through
    every injection; M+ 0..mplus_max_distractors, gradient through the biography's injection only
    (the distractors' new rows are written without a graph), plus the retriever loss."""
    mplus = model.config.kind == "mplus"
    n = rng.randint(0, recipe.mplus_max_distractors if mplus else recipe.max_distractors)
    mb = memory_batch(world, tokenizer, stream, rng, recipe.batch, n, model.num_layers,
                      model.config.num_memory_tokens, model.config.num_tokens, recipe.bio_distractors)
    loss, acc, stats = memory_loss(model, mb, grad_distractors=not mplus,
                                   retriever_weight=recipe.retriever_weight if mplus else 0.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item(), acc.item(), stats


def ema_update(ema: MemoryModel, model: MemoryModel, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def log(record: dict) -> None:
    print(json.dumps(record), flush=True)


def stage1(model: MemoryModel, recipe: Recipe, world: World, tokenizer, people, eval_people, rng, t0: float) -> dict:
    """In-context QA on a fixed world; one biography per question until that is solved (with 1-3 from
    the start a 4-layer model stays at chance: docs/tinymodel.md), then 1-3."""
    budget = recipe.minutes * 60
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.stage1_lr, weight_decay=0.0)
    t1, step, acc, max_bios, curriculum_step = time.time(), 0, 0.0, 1, None
    while time.time() - t0 < recipe.stage1_share * budget:
        for group in opt.param_groups:
            group["lr"] = recipe.stage1_lr * min(1.0, (step + 1) / recipe.warmup_steps)
        loss = lm_step(model, opt, world, tokenizer, people, rng, recipe.stage1_batch, max_bios)
        step += 1
        if step % 50 == 0:
            model.eval()
            acc = in_context_accuracy(model, world, tokenizer, eval_people, seed=step)
            model.train()
            log({"stage": 1, "step": step, "loss": round(loss, 3), "max_bios": max_bios,
                 "in_context_heldout": acc, "min": round((time.time() - t0) / 60, 1)})
            if max_bios == 1 and acc >= recipe.curriculum_target:
                max_bios, curriculum_step = 3, step
            elif max_bios == 3 and acc >= recipe.stage1_target:
                break
    return {"steps": step, "seconds": round(time.time() - t1), "in_context_heldout": acc,
            "one_bio_until_step": curriculum_step}


def memory_stage(model: MemoryModel, recipe: Recipe, world: World, tokenizer, people, eval_people, rng,
                 stream, lr: float, end: float, t0: float) -> tuple[MemoryModel, dict, list[dict]]:
    """Memory training on fresh people (stage 2, or stage 3 for M+) with in-context replay every
    `replay_every`-th step, until time `end`; returns the EMA weights, a summary and the eval history."""
    mplus = model.config.kind == "mplus"
    stage, counts = (3, (0, 8, 24)) if mplus else (2, (0, 2, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    t2, step, history = time.time(), 0, []
    budget = max(1.0, end - t2)
    window: list[tuple[float, float, torch.Tensor | None]] = []
    while time.time() < end:
        frac = (time.time() - t2) / budget
        for group in opt.param_groups:  # warm-up, then cosine decay to 10% over the remaining budget
            group["lr"] = lr * min(1.0, (step + 1) / recipe.warmup_steps) * (
                0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        if recipe.replay_every and step % recipe.replay_every == recipe.replay_every - 1:
            lm_step(model, opt, world, tokenizer, people, rng, recipe.stage1_batch)
        else:
            window.append(memory_step(model, opt, world, tokenizer, stream, rng, recipe))
        ema_update(ema, model, recipe.ema)
        step += 1
        if step % recipe.eval_every == 0:
            rec = {"stage": stage, "step": step, "min": round((time.time() - t0) / 60, 1),
                   "train_loss": round(sum(w[0] for w in window) / max(1, len(window)), 3),
                   "train_acc": round(sum(w[1] for w in window) / max(1, len(window)), 3)}
            stats = [w[2] for w in window if w[2] is not None]
            if stats:
                total = torch.stack(stats).sum(0).tolist()  # see retriever_loss
                rec["retriever_loss"] = round(total[0] / max(total[1], 1), 4)
                rec["retriever_recall@R"] = round(total[4] / max(total[1], 1), 3)
            window = []
            for n in counts:
                rec[f"heldout_n{n}"] = round(recall_accuracy(ema, world, tokenizer, eval_people, n, seed=n), 3)
            rec["in_context"] = in_context_accuracy(ema, world, tokenizer, eval_people, seed=0)
            history.append(rec)
            log(rec)
    return ema, {"steps": step, "seconds": round(time.time() - t2)}, history


def save_tiny(ema: MemoryModel, tokenizer, out: str | Path, record: dict) -> Path:
    ema.tokenizer = tokenizer
    path = save(ema, out)
    (Path(out) / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    return path


def train_memoryllm(recipe: Recipe, out: str | Path) -> dict:
    """Stages 1 and 2 from scratch; the EMA weights saved to `out`."""
    torch.set_num_threads(recipe.threads)
    t0 = time.time()
    recipe = dataclasses.replace(recipe, kind="memoryllm")
    world = build_world(recipe)
    tokenizer = build_tokenizer(world, recipe)
    model = build_model(recipe, tokenizer).train()
    n_params = sum(p.numel() for p in model.parameters())
    log({"event": "built", "params": n_params, "tokenizer_s": round(time.time() - t0, 1), **asdict(recipe)})

    rng = random.Random(f"tinymodel:{recipe.seed}")
    fixed_people = world.people(recipe.stage1_people, "train", seed=recipe.seed)
    eval_people = world.heldout_people(recipe.eval_people, seed=recipe.seed + 1)
    s1 = stage1(model, recipe, world, tokenizer, fixed_people, eval_people, rng, t0)
    stream = world.people_stream("train", seed=recipe.seed + 1000)
    end = t0 + recipe.minutes * 60 - 30  # keep time to save
    ema, s2, history = memory_stage(model, recipe, world, tokenizer, fixed_people, eval_people, rng, stream,
                                    recipe.lr, end, t0)
    path = save_tiny(ema, tokenizer, out, {"recipe": asdict(recipe), "stage1": s1, "stage2": s2, "history": history})
    summary = {"event": "saved", "out": str(path), "params": n_params, "stage1": s1, "stage2": s2,
               "total_s": round(time.time() - t0)}
    log(summary)
    return summary


def train_mplus(recipe: Recipe, memoryllm_dir: str | Path, out: str | Path) -> dict:
    """Stage 3: M+ from the trained MemoryLLM model in `memoryllm_dir`: long-term memory read during
    training (`RowLTM`), the retriever loss, 0..mplus_max_distractors distractors."""
    torch.set_num_threads(recipe.threads)
    t0 = time.time()
    recipe = dataclasses.replace(recipe, kind="mplus")
    base = load(memoryllm_dir)
    tokenizer = base.tokenizer
    model = mplus_from(base, recipe)
    del base
    n_params = sum(p.numel() for p in model.parameters())
    log({"event": "built", "params": n_params, "from": str(memoryllm_dir), **asdict(recipe)})
    world = build_world(recipe)
    rng = random.Random(f"tinymodel-mplus:{recipe.seed}")
    fixed_people = world.people(recipe.stage1_people, "train", seed=recipe.seed)
    eval_people = world.heldout_people(recipe.eval_people, seed=recipe.seed + 1)
    stream = world.people_stream("train", seed=recipe.seed + 2000)
    end = t0 + recipe.mplus_minutes * 60 - 30
    ema, s3, history = memory_stage(model, recipe, world, tokenizer, fixed_people, eval_people, rng, stream,
                                    recipe.mplus_lr, end, t0)
    path = save_tiny(ema, tokenizer, out, {"recipe": asdict(recipe), "from": str(memoryllm_dir), "stage3": s3,
                                           "history": history})
    summary = {"event": "saved", "out": str(path), "params": n_params, "stage3": s3, "total_s": round(time.time() - t0)}
    log(summary)
    return summary


def run(recipe: Recipe, out: str | Path) -> dict:
    """kind memoryllm: stages 1-2 into `out`; mplus: stage 3 from `recipe.init` into `out`; both:
    `out/memoryllm` then `out/mplus` (the shipped pair)."""
    if recipe.kind == "memoryllm":
        return train_memoryllm(recipe, out)
    if recipe.kind == "mplus":
        if not recipe.init:
            raise SystemExit("--kind mplus starts from a trained MemoryLLM tiny model: give --init DIR")
        return train_mplus(recipe, recipe.init, out)
    first = train_memoryllm(recipe, Path(out) / "memoryllm")
    return {"memoryllm": first, "mplus": train_mplus(recipe, Path(out) / "memoryllm", Path(out) / "mplus")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    defaults = Recipe()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if name == "kind":
            parser.add_argument(flag, choices=("memoryllm", "mplus", "both"), default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    ns = vars(parser.parse_args(argv))
    out = ns.pop("out")
    return run(Recipe(**ns), out)


if __name__ == "__main__":
    main()
