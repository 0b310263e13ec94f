"""Our own tiny memory models, trained from scratch on CPU: the seeded recipe.

    python -m memllm.recipes.tiny --out DIR                      # both: DIR/memoryllm, then DIR/mplus
    python -m memllm.recipes.tiny --out DIR --kind memoryllm     # stages 1-2 only
    python -m memllm.recipes.tiny --out DIR --kind mplus --init MEMORYLLM_DIR   # stage 3 only
    python -m memllm.recipes.tiny --out DIR --kind memoryllm --init MEMORYLLM_DIR --stage2-steps S  # more stage 2

The models must look things up: a memory holds several people (and other text) in any order, the
question is about any of them, or about someone never written (answer: ``unknown``), in any of many
wordings. Read top to bottom:

1. ``build_world``, ``build_tokenizer``: a world of invented people with short names (2-3 tokens:
   lookup by a 4-5-token name did not appear in 18 minutes, docs/tinymodel.md) and its tokenizer
   (every attribute value and ``unknown`` is one token).
2. ``build_model``: a tiny Llama memory model (d 128, 4 layers, K 32, N 256: 8 biographies of at
   most 31 tokens fit in short-term memory; M+ adds R = 2 blocks retrieved from long-term memory).
3. ``episode``: one memory's worth of texts (biographies of several people, hard negatives that share
   a name word or facts with the asked person, distractor sentences) and one question about a random
   stored person or a stranger, with a name casing drawn at random.
4. Stage 1 (``stage1``): in-context lookup on a fixed world of people: the episode's texts are the
   context, the loss is on the answer plus a weighted LM loss on the context (without it single
   biographies were not learnable); 1 text per question until that works, then up to 2, then up to
   ``stage1_max_texts``.
5. Stage 2 (``memory_stage``): the same episodes written into per-row memories (fresh people every
   step, so facts cannot be learned into the weights), 1..max_texts injections, the asked person's
   biography at a uniformly random position, the gradient through its injection; every
   ``replay_every``-th step is a stage-1 step. An EMA of the weights is what is evaluated and saved.
6. Stage 3, M+ (``train_mplus``): the MemoryLLM model plus a retriever (``mplus_from``), trained the
   same way with up to ``mplus_max_texts`` texts, every row reading its long-term memory
   (``memllm.core.mplus.RowLTM``, exactly as inference does) and the retriever loss on the asked person's
   long-term vectors (so what is retrieved depends on the question).
7. ``save_tiny``: the EMA weights with the tokenizer and ``recipe.json`` (recipe, world, per-stage
   steps, seconds and a hash of the data stream, the evaluation history).

Stages run for a number of steps; ``--max-minutes`` is only a cap, and a stage that hits it says so in
``recipe.json``. Everything random is derived from ``--seed`` (the world, the tokenizer, the data
streams, the initialisation and the memory drops), so a rerun with the same seed and steps on the
same software gives the same weights.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from memllm.core.checkpoint import load, save
from memllm.core.inject import delta_memory
from memllm.core.model import MemoryModel
from memllm.core.mplus import RowLTM, drop_to_ltm
from memllm.train.retriever import layer_inputs, retriever_loss
from memllm.core.tiny import random_model
from memllm.synthetic.tokenizer import train_world_tokenizer
from memllm.train.trainer import write, write_docs
from memllm.synthetic.world import ABSTAIN, Person, World, WorldConfig


@dataclass
class Recipe:
    """Everything that fixes a tiny model; the defaults are the shipped recipe."""

    kind: str = "both"  # memoryllm | mplus (from `init`) | both
    init: str = ""  # kind mplus: the trained MemoryLLM tiny model to start from
    seed: int = 0
    max_minutes: float = 0.0  # a cap per stage (0: none); the step counts below are the schedule
    # the world: names of first_name_syllables + 1..last_name_syllables syllables
    first_name_syllables: int = 1
    last_name_syllables: int = 2
    vocab_size: int = 1024
    tokenizer_docs: int = 10_000
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 344
    num_tokens: int = 32  # K
    stm_blocks: int = 8  # N = stm_blocks * K
    ltm_blocks: int = 2  # M+ only: R = ltm_blocks * K
    # episodes (all stages)
    bio_share: float = 0.6  # share of the other texts that are other people's biographies (else distractors)
    hard_negative_share: float = 0.5  # share of those that share a name word or 1-3 facts with the asked person
    stranger_share: float = 0.15  # questions about someone not in the texts (answer: unknown)
    casing_share: float = 0.2  # questions with the name in upper or lower case
    # stage 1: in-context lookup
    stage1_steps: int = 3000
    stage1_people: int = 2000
    stage1_batch: int = 64
    stage1_lr: float = 2e-3
    stage1_max_texts: int = 6
    context_lm_weight: float = 0.25
    curriculum_target: float = 0.8  # held-out in-context accuracy that lets the texts per question grow
    warmup_steps: int = 100
    # stage 2: memory
    stage2_steps: int = 2500
    batch: int = 32
    lr: float = 1e-3
    max_texts: int = 16  # texts per memory: 1..max_texts (2x the short-term capacity in biographies)
    replay_every: int = 4
    ema: float = 0.99
    eval_every: int = 200
    eval_people: int = 64
    threads: int = 1  # on the shared 2-core machine 2 threads ran 8x slower than 1 (OpenMP threads wait on each other)
    # stage 3: M+, from the trained MemoryLLM model
    stage3_steps: int = 1200
    mplus_lr: float = 5e-4
    mplus_max_texts: int = 40  # 5x the short-term capacity
    retriever_weight: float = 1.0

    @property
    def pool_size(self) -> int:
        return self.stm_blocks * self.num_tokens


# ---- 1, 2: world, tokenizer and model -------------------------------------------------------------


def build_world(recipe: Recipe) -> World:
    return World(WorldConfig(seed=recipe.seed, first_name_syllables=(recipe.first_name_syllables,) * 2,
                             last_name_syllables=(1, recipe.last_name_syllables)))


def build_tokenizer(world: World, recipe: Recipe):
    return train_world_tokenizer(world, vocab_size=recipe.vocab_size, seed=recipe.seed,
                                 n_docs=recipe.tokenizer_docs)


def build_model(recipe: Recipe, tokenizer) -> MemoryModel:
    """A randomly initialised tiny Llama memory model with the world tokenizer; initialised pool.

    M+ adds R = ltm_blocks * K retrieved slots and the retriever (query/key projectors, selector dim
    32). Its long-term memory merges at every update and never decays: the tiny model's whole history
    stays retrievable, and training reads it exactly as inference does (`memllm.core.mplus.RowLTM`)."""
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


# ---- 3: episodes ----------------------------------------------------------------------------------


@dataclass
class Episode:
    """What one memory (or one context) holds, oldest first, and one question about it."""

    texts: list[str]
    target: int  # index of the asked person's biography in texts; -1: a stranger is asked
    prompt: str  # ends with "A:"
    answer: str  # " value", or " unknown" for a stranger


def _similar(world: World, rng: random.Random, person: Person, fresh: Person) -> Person:
    """`fresh`, made a hard negative of `person`: it shares a name word, or 1-3 facts, or both."""
    name, attrs = fresh.name, dict(fresh.attrs)
    if rng.random() < 0.5:
        words, theirs = name.split(" "), person.name.split(" ")
        i = rng.randrange(2)
        words[i] = theirs[i]
        candidate = " ".join(words)
        if candidate != person.name and world.split_of(candidate) == world.split_of(person.name):
            name = candidate
    if rng.random() < 0.7:
        for a in rng.sample(world.attributes, rng.randint(1, 3)):
            attrs[a] = person.attrs[a]
    return Person(name=name, attrs=attrs)


def episode(world: World, recipe: Recipe, rng: random.Random, draw, n_texts: int, target: int,
            stranger: bool | None = None, phrasings: str = "train", casing: str | None = None,
            bio_share: float | None = None) -> Episode:
    """`n_texts` texts with the asked person's biography at index `target`; the others are other
    people's biographies (a share `bio_share`, half of them hard negatives) or distractor sentences.
    `draw()` gives a fresh person. A stranger question (drawn with `stranger_share` if None) asks about
    someone who is in none of the texts, often sharing a name word with the one at `target`."""
    stranger = rng.random() < recipe.stranger_share if stranger is None else stranger
    bio_share = recipe.bio_share if bio_share is None else bio_share
    person = draw()
    names = {person.name}
    texts: list[str] = []
    for i in range(n_texts):
        if i == target:
            texts.append(world.biography(person, rng))
            continue
        if rng.random() >= bio_share:
            texts.append(world.distractor(rng))
            continue
        other = draw()
        if rng.random() < recipe.hard_negative_share:
            other = _similar(world, rng, person, other)
        if other.name in names:
            texts.append(world.distractor(rng))
            continue
        names.add(other.name)
        texts.append(world.biography(other, rng))
    asked = person
    if stranger:
        asked = draw()
        if rng.random() < 0.5:
            asked = _similar(world, rng, person, asked)
        while asked.name in names:
            asked = draw()
    if casing is None:
        casing = "as_is" if rng.random() >= recipe.casing_share else rng.choice(("upper", "lower"))
    prompt, answer = world.question(asked, rng.choice(world.attributes), rng, phrasings=phrasings,
                                    casing=casing, stranger=stranger)
    return Episode(texts, -1 if stranger else target, prompt, answer)


# ---- data -----------------------------------------------------------------------------------------


def encode(tokenizer, texts: list[str], bos: bool = True) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=bos)["input_ids"] for t in texts]


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    T = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (T - len(r)) for r in rows], dtype=torch.long)


def answer_id(tokenizer, answer: str) -> int:
    ids = encode(tokenizer, [answer], bos=False)[0]
    if len(ids) != 1:
        raise ValueError(f"answer {answer!r} is {len(ids)} tokens; the world's answers are one token each")
    return ids[0]


@dataclass
class ContextBatch:
    ids: torch.Tensor  # [B, T] <bos> context question answer, right-padded
    answer_pos: torch.Tensor  # [B] position whose logits predict the answer
    answers: torch.Tensor  # [B]
    context_len: torch.Tensor  # [B] tokens of <bos> + context (LM loss on them)


def context_batch(world: World, recipe: Recipe, tokenizer, people, rng: random.Random, batch: int,
                  max_texts: int, min_texts: int = 1, **kw) -> ContextBatch:
    """In-context lookup rows: an episode of min_texts..max_texts texts (target at a random index) as
    the context, then its question and answer."""
    rows, pos, answers, ctx_len = [], [], [], []
    for _ in range(batch):
        n = rng.randint(min_texts, max_texts)
        ep = episode(world, recipe, rng, lambda: rng.choice(people), n, rng.randrange(n), **kw)
        ctx = encode(tokenizer, [" ".join(ep.texts)])[0]
        q = encode(tokenizer, [" " + ep.prompt], bos=False)[0]
        a = answer_id(tokenizer, ep.answer)
        rows.append(ctx + q + [a])
        pos.append(len(ctx) + len(q) - 1)
        answers.append(a)
        ctx_len.append(len(ctx))
    return ContextBatch(pad(rows, tokenizer.pad_token_id), torch.tensor(pos), torch.tensor(answers),
                        torch.tensor(ctx_len))


def context_loss(model: MemoryModel, cb: ContextBatch, lm_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer loss + lm_weight * LM loss on the context, correct [B] bool)."""
    logits = model.lm(cb.ids).logits  # [B, T, V]
    rows = torch.arange(len(cb.ids))
    at_answer = logits[rows, cb.answer_pos]
    loss = F.cross_entropy(at_answer, cb.answers)
    if lm_weight:
        T = cb.ids.shape[1]
        in_context = torch.arange(T - 1).unsqueeze(0) < (cb.context_len - 1).unsqueeze(1)  # [B, T-1]
        target = cb.ids[:, 1:].masked_fill(~in_context, -100)
        loss = loss + lm_weight * F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                  ignore_index=-100)
    return loss, at_answer.argmax(-1) == cb.answers


@dataclass
class MemoryBatch:
    texts: list[list[list[int]]]  # n_texts injections, each B token lists (no <bos>, as `model.inject` encodes)
    target: int  # index of the injection holding the asked person's biography (the same in every row)
    strangers: torch.Tensor  # [B] bool: the row asks about someone not in memory
    questions: torch.Tensor  # [B, T] prompt + answer, right-padded
    labels: torch.Tensor  # [B, T] -100 except the answer token
    kept: list[torch.Tensor]  # per injection [B, L, N - K] surviving rows


def memory_batch(world: World, recipe: Recipe, tokenizer, draw, rng: random.Random, batch: int, n_texts: int,
                 target: int, num_layers: int, N: int, K: int, **kw) -> MemoryBatch:
    """B episodes of n_texts texts with the asked biography at injection `target` in every row (so
    that the gradient needs to flow through one injection only), and their memory drops."""
    eps = [episode(world, recipe, rng, draw, n_texts, target, **kw) for _ in range(batch)]
    texts = [encode(tokenizer, [ep.texts[i] for ep in eps], bos=False) for i in range(n_texts)]
    prompts = encode(tokenizer, [ep.prompt for ep in eps], bos=False)
    answers = [answer_id(tokenizer, ep.answer) for ep in eps]
    questions = pad([p + [a] for p, a in zip(prompts, answers)], tokenizer.pad_token_id)
    labels = torch.full_like(questions, -100)
    for b, p in enumerate(prompts):
        labels[b, len(p)] = answers[b]
    g = torch.Generator().manual_seed(rng.randrange(1 << 62))
    kept = [torch.rand(batch, num_layers, N, generator=g).argsort(-1)[..., : N - K].sort(-1).values
            for _ in range(n_texts)]
    strangers = torch.tensor([ep.target < 0 for ep in eps])
    return MemoryBatch(texts, target, strangers, questions, labels, kept)


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


def memory_loss(model: MemoryModel, mb: MemoryBatch, retriever_weight: float = 0.0,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, correct [B] bool of the argmax answer, retriever statistics or None) after writing every
    text of the batch into per-row memories, the gradient flowing through the target's injection.
    The loss is on the answer token (plus, for M+, retriever_weight times the retriever loss whose
    positives are the asked person's vectors in long-term memory)."""
    B = mb.questions.shape[0]
    pools = start_pools(model, B)
    mplus = model.config.kind == "mplus"
    if mplus:  # long-term memory per row, and which injection wrote each vector
        L, N = pools.shape[1:3]
        ltm, ages = RowLTM.empty(pools), torch.zeros(B, L, N, dtype=torch.long)
        docs = torch.full((B, L, N), -1, dtype=torch.long)
    for i, rows in enumerate(mb.texts):
        if mplus:
            ltm, ages = drop_to_ltm(ltm, pools, ages, mb.kept[i], docs)
            docs = write_docs(docs, torch.full((B,), i), mb.kept[i])
        pools = inject_rows(model, pools, rows, mb.kept[i], grad=i == mb.target)
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
    correct = logits.argmax(-1)[mask] == target[mask]  # one answer per row, in row order
    stats = None
    if mplus and ltm.size:
        positive = (ltm.docs == mb.target) & ~mb.strangers.view(B, 1, 1)
        r_loss, stats = retriever_loss(model, captured, ltm.vectors, positive)
        loss = loss + retriever_weight * r_loss
    return loss, correct, stats


# ---- evaluation during training (held-out people) -------------------------------------------------


def eval_conditions(mplus: bool) -> dict[str, dict]:
    """Named held-out probes: texts per memory, which index is asked (None: every index in turn), and
    episode options. `before4`: four distractor sentences, then the biography; `stranger`: accuracy is
    the abstention rate."""
    conds = {"k1": {"n": 1}, "k4": {"n": 4, "bio_share": 1.0}, "k8": {"n": 8, "bio_share": 1.0},
             "before4": {"n": 5, "target": 4, "bio_share": 0.0},
             "stranger": {"n": 4, "bio_share": 1.0, "stranger": True},
             "heldout_phrasing_k4": {"n": 4, "bio_share": 1.0, "phrasings": "heldout"}}
    if mplus:
        conds["k32"] = {"n": 32, "bio_share": 1.0}
        conds["one_then_32"] = {"n": 33, "target": 0, "bio_share": 1.0}
    return conds


@torch.no_grad()
def memory_accuracy(model: MemoryModel, world: World, recipe: Recipe, tokenizer, people, seed: int,
                    n: int, target: int | None = None, **kw) -> float:
    """Held-out accuracy from memory: len(people) episodes of n texts about people drawn from
    `people`, the asked index spread evenly over the n positions unless `target` is given; no stranger
    questions unless asked for."""
    rng = random.Random(f"eval:{seed}")

    def draw() -> Person:
        return rng.choice(people)

    kw = {"stranger": False, "casing": "as_is", **kw}
    targets = [target] if target is not None else list(range(n))
    per = max(1, len(people) // len(targets))
    correct = []
    for t in targets:
        mb = memory_batch(world, recipe, tokenizer, draw, rng, per, n, t, model.num_layers,
                          model.config.num_memory_tokens, model.config.num_tokens, **kw)
        correct.append(memory_loss(model, mb)[1])
    return torch.cat(correct).float().mean().item()


@torch.no_grad()
def in_context_accuracy(model: MemoryModel, world: World, recipe: Recipe, tokenizer, people, seed: int,
                        n: int) -> float:
    """Held-out in-context lookup accuracy with exactly n biographies in the context."""
    cb = context_batch(world, recipe, tokenizer, people, random.Random(f"in-context:{seed}"), len(people), n,
                       min_texts=n, stranger=False, casing="as_is", bio_share=1.0)
    return context_loss(model, cb, 0.0)[1].float().mean().item()


# ---- training -------------------------------------------------------------------------------------


class DataHash:
    """A running sha256 of every batch a stage trains on: two runs that saw the same data agree."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def add(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            self.h.update(t.contiguous().numpy().tobytes())

    def hexdigest(self) -> str:
        return self.h.hexdigest()[:16]


def optimizer_step(model: MemoryModel, opt, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def context_step(model: MemoryModel, opt, world, recipe: Recipe, tokenizer, people, rng, max_texts: int,
                 data: DataHash) -> float:
    """One in-context step. With one text per question there are no strangers and no name casings yet:
    a stranger who shares a name word with the one person in context already needs lookup by name,
    and with it from the start single-biography QA did not take off in 1,100 steps (docs/tinymodel.md)."""
    easy = {"stranger": False, "casing": "as_is"} if max_texts == 1 else {}
    cb = context_batch(world, recipe, tokenizer, people, rng, recipe.stage1_batch, max_texts, **easy)
    data.add(cb.ids)
    loss, _ = context_loss(model, cb, recipe.context_lm_weight)
    optimizer_step(model, opt, loss)
    return loss.item()


def memory_step(model: MemoryModel, opt, world, recipe: Recipe, tokenizer, draw, rng, data: DataHash
                ) -> tuple[float, float, torch.Tensor | None]:
    """One memory-training step: 1..max_texts texts per memory (M+: mplus_max_texts), the asked
    person's biography at a uniformly random injection."""
    mplus = model.config.kind == "mplus"
    n = rng.randint(1, recipe.mplus_max_texts if mplus else recipe.max_texts)
    mb = memory_batch(world, recipe, tokenizer, draw, rng, recipe.batch, n, rng.randrange(n), model.num_layers,
                      model.config.num_memory_tokens, model.config.num_tokens)
    data.add(mb.questions, *(pad(rows, 0) for rows in mb.texts))
    loss, correct, stats = memory_loss(model, mb, retriever_weight=recipe.retriever_weight if mplus else 0.0)
    optimizer_step(model, opt, loss)
    return loss.item(), correct.float().mean().item(), stats


def ema_update(ema: MemoryModel, model: MemoryModel, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def log(record: dict) -> None:
    print(json.dumps(record), flush=True)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% at the last step."""
    return lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / max(steps, 1), 1.0))))


def out_of_time(t_start: float, recipe: Recipe) -> bool:
    return bool(recipe.max_minutes) and time.time() - t_start > recipe.max_minutes * 60


def stage1(model: MemoryModel, recipe: Recipe, world: World, tokenizer, people, eval_people, rng) -> dict:
    """In-context lookup on a fixed world: 1 text per question until held-out accuracy reaches
    curriculum_target, then up to 2 texts until that holds with 2 biographies, then up to
    stage1_max_texts."""
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.stage1_lr, weight_decay=0.0)
    t1, max_texts, grown, data, capped = time.time(), 1, {}, DataHash(), False
    step = 0
    for step in range(recipe.stage1_steps):
        if out_of_time(t1, recipe):
            capped = True
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe.stage1_steps, recipe.stage1_lr, recipe.warmup_steps)
        loss = context_step(model, opt, world, recipe, tokenizer, people, rng, max_texts, data)
        if (step + 1) % 100 == 0:
            model.eval()
            rec = {"stage": 1, "step": step + 1, "loss": round(loss, 3), "max_texts": max_texts,
                   "min": round((time.time() - t1) / 60, 1)}
            for n in (1, 2, 4):
                rec[f"in_context_k{n}"] = round(in_context_accuracy(model, world, recipe, tokenizer, eval_people,
                                                                    seed=step, n=n), 3)
            model.train()
            log(rec)
            if max_texts == 1 and rec["in_context_k1"] >= recipe.curriculum_target:
                max_texts, grown["2"] = 2, step + 1
            elif max_texts == 2 and rec["in_context_k2"] >= recipe.curriculum_target:
                max_texts, grown[str(recipe.stage1_max_texts)] = recipe.stage1_max_texts, step + 1
    else:
        step = recipe.stage1_steps
    return {"steps": step, "seconds": round(time.time() - t1), "capped_by_minutes": capped,
            "max_texts_from_step": grown, "data_sha256": data.hexdigest()}


def memory_stage(model: MemoryModel, recipe: Recipe, world: World, tokenizer, people, eval_people, rng,
                 draw, lr: float, steps: int) -> tuple[MemoryModel, dict, list[dict]]:
    """Memory training on fresh people (stage 2, or stage 3 for M+) with in-context replay every
    `replay_every`-th step; returns the EMA weights, a summary and the eval history."""
    mplus = model.config.kind == "mplus"
    stage = 3 if mplus else 2
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    t2, history, data, capped = time.time(), [], DataHash(), False
    window: list[tuple[float, float, torch.Tensor | None]] = []
    step = 0
    for step in range(steps):
        if out_of_time(t2, recipe):
            capped = True
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, recipe.warmup_steps)
        if recipe.replay_every and step % recipe.replay_every == recipe.replay_every - 1:
            context_step(model, opt, world, recipe, tokenizer, people, rng, recipe.stage1_max_texts, data)
        else:
            window.append(memory_step(model, opt, world, recipe, tokenizer, draw, rng, data))
        ema_update(ema, model, recipe.ema)
        if (step + 1) % recipe.eval_every == 0 or step + 1 == steps:
            rec = {"stage": stage, "step": step + 1, "min": round((time.time() - t2) / 60, 1),
                   "train_loss": round(sum(w[0] for w in window) / max(1, len(window)), 3),
                   "train_acc": round(sum(w[1] for w in window) / max(1, len(window)), 3)}
            stats = [w[2] for w in window if w[2] is not None]
            if stats:
                total = torch.stack(stats).sum(0).tolist()  # see retriever_loss
                rec["retriever_loss"] = round(total[0] / max(total[1], 1), 4)
                rec["retriever_recall@R"] = round(total[4] / max(total[1], 1), 3)
            window = []
            for name, cond in eval_conditions(mplus).items():
                rec[name] = round(memory_accuracy(ema, world, recipe, tokenizer, eval_people, seed=0, **cond), 3)
            rec["in_context_k4"] = round(in_context_accuracy(ema, world, recipe, tokenizer, eval_people, 0, 4), 3)
            history.append(rec)
            log(rec)
    else:
        step = steps
    return ema, {"steps": step, "seconds": round(time.time() - t2), "capped_by_minutes": capped,
                 "data_sha256": data.hexdigest()}, history


def save_tiny(ema: MemoryModel, tokenizer, out: str | Path, record: dict) -> Path:
    ema.tokenizer = tokenizer
    path = save(ema, out)
    (Path(out) / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    return path


def train_memoryllm(recipe: Recipe, out: str | Path) -> dict:
    """Stages 1 and 2 from scratch, or (with `recipe.init`) stage 2 continued from a trained tiny
    MemoryLLM model for stage2_steps more steps; the EMA weights saved to `out`."""
    torch.set_num_threads(recipe.threads)
    t0 = time.time()
    recipe = dataclasses.replace(recipe, kind="memoryllm")
    world = build_world(recipe)
    if recipe.init:
        model = load(recipe.init).train()
        tokenizer = model.tokenizer
    else:
        tokenizer = build_tokenizer(world, recipe)
        model = build_model(recipe, tokenizer).train()
    n_params = sum(p.numel() for p in model.parameters())
    log({"event": "built", "params": n_params, "tokenizer_s": round(time.time() - t0, 1), **asdict(recipe)})

    rng = random.Random(f"tinymodel:{recipe.seed}:{'continued' if recipe.init else 'scratch'}")
    fixed_people = world.people(recipe.stage1_people, "train", seed=recipe.seed)
    eval_people = world.heldout_people(recipe.eval_people, seed=recipe.seed + 1)
    s1 = {"from": recipe.init} if recipe.init else stage1(model, recipe, world, tokenizer, fixed_people,
                                                          eval_people, rng)
    draw = world.people_stream("train", seed=recipe.seed + (3000 if recipe.init else 1000)).__next__
    ema, s2, history = memory_stage(model, recipe, world, tokenizer, fixed_people, eval_people, rng, draw,
                                    recipe.lr, recipe.stage2_steps)
    command = f"python -m memllm.recipes.tiny --kind memoryllm --seed {recipe.seed}"
    if recipe.init:
        command += f" --init {recipe.init} --stage2-steps {recipe.stage2_steps}"
        earlier = json.loads((Path(recipe.init) / "recipe.json").read_text())
        s1 = {"earlier_run": {k: earlier.get(k) for k in ("stage1", "stage2", "command")}}
    record = {"recipe": asdict(recipe), "world": asdict(world.config), "stage1": s1, "stage2": s2,
              "history": history, "command": command}
    path = save_tiny(ema, tokenizer, out, record)
    summary = {"event": "saved", "out": str(path), "params": n_params, "stage1": s1, "stage2": s2,
               "total_s": round(time.time() - t0)}
    log(summary)
    return summary


def train_mplus(recipe: Recipe, memoryllm_dir: str | Path, out: str | Path) -> dict:
    """Stage 3: M+ from the trained MemoryLLM model in `memoryllm_dir`: long-term memory read during
    training (`RowLTM`), the retriever loss, up to mplus_max_texts texts per memory."""
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
    draw = world.people_stream("train", seed=recipe.seed + 2000).__next__
    ema, s3, history = memory_stage(model, recipe, world, tokenizer, fixed_people, eval_people, rng, draw,
                                    recipe.mplus_lr, recipe.stage3_steps)
    record = {"recipe": asdict(recipe), "world": asdict(world.config), "from": str(memoryllm_dir), "stage3": s3,
              "history": history,
              "command": f"python -m memllm.recipes.tiny --kind mplus --init MEMORYLLM_DIR --seed {recipe.seed}"}
    path = save_tiny(ema, tokenizer, out, record)
    summary = {"event": "saved", "out": str(path), "params": n_params, "stage3": s3, "total_s": round(time.time() - t0)}
    log(summary)
    return summary


def run(recipe: Recipe, out: str | Path) -> dict:
    """kind memoryllm: stages 1-2 into `out`; mplus: stage 3 from `recipe.init` into `out`; both:
    `out/memoryllm` then `out/mplus` (the shipped pair)."""
    if recipe.kind == "memoryllm":  # with --init: stage 2 continued from that model
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
