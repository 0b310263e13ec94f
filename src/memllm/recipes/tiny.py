"""Our own tiny memory models, trained from scratch on CPU: the seeded recipe.

    memllm recipe tiny --out DIR                      # both: DIR/memoryllm, then DIR/mplus
    memllm recipe tiny --out DIR --kind memoryllm     # stages 1-2 only
    memllm recipe tiny --out DIR --kind mplus --init MEMORYLLM_DIR   # stage 3 only
    memllm recipe tiny --out DIR --kind memoryllm --init STAGE1_DIR   # stage 2 from a --stage1-out model

The models must look things up: a memory holds several people (and other text) in any order, the
question is about any of them, or about someone never written (answer: ``unknown``), in any of many
wordings. The recipe is a data source and a configuration: every stage runs the one training loop
of ``memllm train`` (``memllm.train.loop.fit``, in one process without accelerate) on its
question-answering objectives (``memllm.train.objectives.lookup_qa`` and ``memory_qa``). Read top
to bottom:

1. ``build_world``, ``build_tokenizer``: a world of invented people with short names (2-3 tokens:
   lookup by a 4-5-token name did not appear in 18 minutes, docs/tinymodel.md) and its tokenizer
   (every attribute value and ``unknown`` is one token).
2. ``build_model``: a tiny Llama memory model (d 128, 2 layers, K 32, N 256: 8 biographies of at
   most 31 tokens fit in short-term memory; M+ adds R = 2 blocks retrieved from long-term memory).
3. ``episode``: one memory's worth of texts (biographies of several people, hard negatives that share
   a name word or facts with the asked person, distractor sentences) and one question about a random
   stored person or a stranger, with a name casing drawn at random; ``memory_batch`` turns episodes
   into memory rows. ``lookup_row`` / ``lookup_batch``: in-context rows of 1-8 one-fact texts ("Ga Rus.
   Works at Zorora.", half the time all of one attribute, so that only the names tell them apart) or
   1-4 whole biographies, then several questions (and recalls) about random stored facts or strangers.
4. Stage 1 (``stage1``): in-context lookup on fresh people: the loss on every answer, a weighted LM
   loss on the texts (without it single biographies were not learnable) and the subject loss
   (``objectives.SubjectHead``: from the hidden state after the first layer, the name of whom the
   current text or question is about). Without the subject loss no configuration learned lookup by
   name in thousands of steps (the model answered with the asked kind of fact of a random person);
   with it, lookup among 8 one-fact texts appeared in about 1,300 steps (docs/tinymodel.md). 1a: one-fact
   texts only, at a constant learning rate, until a held-out gate (8 people of one attribute ≥ 0.8);
   1b: whole biographies and name casings join. ``--stage1-out`` keeps this model.
5. Stage 2 (``memory_stage``): the same episodes written into per-row memories (fresh people every
   step, so facts cannot be learned into the weights), 1..max_texts injections, the asked person's
   biography at a uniformly random position, the gradient through its injection; every
   ``replay_every``-th step is a stage-1 step (people of a fixed world). Besides the answer, the LM
   loss of the asked person's biography read back from memory (``memory_recall_weight``) and the
   subject loss on the memory rows its injection writes (``memory_subject_weight``): with the answer
   alone the in-context model never learned to read its memory. 2a (``stage2_read_steps``): 1-2 texts,
   no strangers, until it reads; 2b (``stage2_steps``): the full episodes. Each phase starts from the
   EMA weights of the one before, exactly as a run with ``--init`` of that model would (so the chain
   of commands the shipped model came from and the one command give the same weights).
6. Stage 3, M+ (``train_mplus``): the MemoryLLM model plus a retriever (``mplus_from``), trained the
   same way in phases (``mplus_phases``: 3, 3b, 3c, ..., each STEPS:TEXTS) with ever more texts per
   memory (so that the asked person is found among many more long-term rows), every row reading its
   long-term memory
   (``memllm.core.mplus.RowLTM``, exactly as inference does) and the retriever loss on the asked person's
   long-term vectors (so what is retrieved depends on the question); the recall read-back retrieves
   with the biography as its query.
7. ``save_tiny``: the EMA weights with the tokenizer and ``recipe.json`` (recipe, world, per-stage
   steps, seconds, loss trend and a hash of the data stream, the evaluation history).

Stages run for a number of steps, which drive the learning-rate schedule; ``--max-minutes`` is only a
cap, and a stage that hits it says so in ``recipe.json``. Everything random is derived from
``--seed`` (the world, the tokenizer, the data streams, the initialisation and the memory drops), so
a rerun with the same seed and steps on the same software gives the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from memllm.core.checkpoint import load, save
from memllm.core.model import MemoryModel
from memllm.core.ops import kept_rows
from memllm.core.tiny import random_model
from memllm.synthetic.tokenizer import train_world_tokenizer
from memllm.synthetic.world import Person, World, WorldConfig
from memllm.train.data import ContextBatch, LookupBatch, MemoryBatch, pad
from memllm.train.loop import EMA, DataHash, SingleProcess, fit, loss_trend, make_optimizer
from memllm.train.objectives import SubjectHead, context_qa, lookup_qa, memory_qa
from memllm.train.options import option


@dataclass
class Recipe:
    """Everything that fixes a tiny model; the defaults are the shipped recipe."""

    kind: str = option("both", "memoryllm: stages 1-2; mplus: stage 3 from `init`; both: memoryllm then mplus",
                       choices=("memoryllm", "mplus", "both"))
    init: str = option("", "kind mplus: the trained MemoryLLM tiny model to start from; kind memoryllm: "
                           "run (more) stage 2 from this model (a stage-1 model from --stage1-out, or a trained one)")
    seed: int = option(1, "everything random: world, tokenizer, data streams, initialisation, memory drops "
                          "(seed 0's stage 1 had not passed the gate by step 2,700)")
    max_minutes: float = option(0.0, "a cap per stage (0: none); the step counts below are the schedule")
    first_name_syllables: int = option(1, "the world's names: first names of this many syllables ...")
    last_name_syllables: int = option(2, "... and last names of 1 to this many")
    vocab_size: int = option(1024, "tokenizer vocabulary")
    tokenizer_docs: int = option(10_000, "world documents the tokenizer is trained on")
    hidden_size: int = option(128, "model width d")
    num_layers: int = option(2, "decoder layers")
    num_heads: int = option(4, "attention heads")
    intermediate_size: int = option(344, "MLP width")
    num_tokens: int = option(32, "K: memory vectors written per injection and layer")
    stm_blocks: int = option(8, "short-term memory N = stm_blocks * K")
    ltm_blocks: int = option(2, "M+ only: R = ltm_blocks * K vectors retrieved from long-term memory")
    bio_share: float = option(0.6, "episodes: share of the other texts that are other people's biographies "
                                   "(else distractors)")
    hard_negative_share: float = option(0.5, "share of those that share a name word or 1-3 facts with the asked person")
    stranger_share: float = option(0.15, "questions about someone not in the texts (answer: unknown)")
    casing_share: float = option(0.2, "questions with the name in upper or lower case (stage 1a: none)")
    stage1_steps: int = option(6000, "stage 1a (in-context lookup among one-fact texts, constant learning rate): "
                                     "at most this many steps; the gate usually ends it earlier")
    stage1_gate: float = option(0.8, "stage 1a ends at the first held-out check where lookup among 8 one-fact texts "
                                     "of one attribute reaches this (0: no gate)")
    stage1_eval_every: int = option(100, "stage 1: steps between held-out checks")
    stage1_bio_steps: int = option(1500, "stage 1b: steps with whole biographies and name casings joining "
                                         "(cosine decay from stage1_lr)")
    stage1_out: str = option("", "also save the model after stage 1 here (stage 2 from it: --init DIR)")
    stage1_people: int = option(2000, "replay rows of the memory stages: the fixed world of people they draw from")
    stage1_batch: int = option(64, "stage 1 (and replay): rows per step")
    stage1_lr: float = option(2e-3, "stage 1: peak learning rate")
    stage1_max_texts: int = option(8, "stage 1 (and replay): one-fact texts per context, 1..this")
    stage1_bio_share: float = option(0.3, "stage 1b (and replay): contexts of whole biographies (1..4), else "
                                          "one-fact texts (stage 1a: none)")
    stage1_questions: int = option(4, "stage 1 (and replay): questions per context")
    stage1_recalls: int = option(2, "stage 1 (and replay): recalls per context of one-fact texts (a text's words "
                                    "up to its value, then the value)")
    same_attribute_share: float = option(0.5, "stage 1 (and replay): contexts whose one-fact texts all state the "
                                              "same attribute (only the name tells them apart)")
    subject_weight: float = option(1.0, "weight of the subject loss (train.objectives.SubjectHead) in-context")
    subject_layer: int = option(1, "the subject loss reads the hidden state after this many layers")
    memory_recall_weight: float = option(1.0, "stages 2-3: weight of the LM loss on the asked person's biography "
                                              "read back from memory (what made the in-context model read it)")
    memory_subject_weight: float = option(1.0, "stages 2-3: weight of the subject loss on the memory rows the asked "
                                               "person's injection writes for layer subject_layer")
    context_lm_weight: float = option(0.25, "weight of the LM loss on the context in in-context steps")
    warmup_steps: int = option(100, "linear learning-rate warm-up steps of every stage")
    weight_decay: float = option(0.0, "AdamW weight decay of every stage")
    stage2_read_steps: int = option(1600, "stage 2a (memory, 1-2 texts, no strangers): optimizer steps; the model "
                                          "began to read its memory between steps 1,000 and 1,200")
    stage2_steps: int = option(1500, "stage 2b (memory, the full episodes, from 2a's EMA weights): optimizer steps")
    batch: int = option(32, "stages 2-3: rows (memories) per step")
    lr: float = option(1e-3, "stage 2: peak learning rate")
    max_texts: int = option(16, "stage 2: texts per memory, 1..max_texts (2x the short-term capacity in biographies)")
    replay_every: int = option(4, "stages 2-3: every this many steps an in-context step (0: none)")
    ema: float = option(0.99, "stages 2-3: decay of the weights' EMA, which is evaluated and saved")
    eval_every: int = option(200, "stages 2-3: steps between held-out evaluations")
    eval_people: int = option(64, "held-out people per evaluation")
    threads: int = option(1, "torch threads (on the shared 2-core machine 2 threads ran 8x slower than 1)")
    mplus_phases: list[str] = option(
        ["1200:40", "600:100", "700:128", "400:160"],
        "stage 3 (M+, from the trained MemoryLLM model): its phases 3, 3b, 3c, ... in order as STEPS:TEXTS, "
        "given once per phase: optimizer steps, and 1..TEXTS texts per memory (40 = 5x the short-term capacity; "
        "longer memories after, so that the asked person is found among more long-term rows); each phase "
        "starts from the EMA weights of the one before")
    mplus_lr: float = option(5e-4, "stage 3: peak learning rate of every phase")
    retriever_weight: float = option(1.0, "stage 3: weight of the retriever loss")

    def __post_init__(self) -> None:
        stage3_phases(self)  # a malformed phase fails here, not after hours of stages 1-2

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
    subject: str = ""  # the name of the person whose biography is texts[target] (for a stranger too)


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
    return Episode(texts, -1 if stranger else target, prompt, answer, person.name)


# ---- the objectives' batches ----------------------------------------------------------------------


def encode(tokenizer, texts: list[str], bos: bool = True) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=bos)["input_ids"] for t in texts]


def answer_id(tokenizer, answer: str) -> int:
    ids = encode(tokenizer, [answer], bos=False)[0]
    if len(ids) != 1:
        raise ValueError(f"answer {answer!r} is {len(ids)} tokens; the world's answers are one token each")
    return ids[0]


def context_batch(world: World, recipe: Recipe, tokenizer, people, rng: random.Random, batch: int,
                  max_texts: int, min_texts: int = 1, **kw) -> ContextBatch:
    """In-context lookup rows (`context_qa`): an episode of min_texts..max_texts texts (target at a
    random index) as the context, then its question and answer."""
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


def _name_end(ids: list[int], name: list[int]) -> int:
    """The position of the last token of `name` in `ids` (its first occurrence), or len(ids)."""
    return next((i + len(name) - 1 for i in range(len(ids)) if ids[i:i + len(name)] == name), len(ids))


def lookup_row(world: World, recipe: Recipe, tokenizer, rng: random.Random, draw, k: int, bios: bool,
               same_attribute: bool, questions: int, recalls: int, stranger_share: float | None = None,
               phrasings: str = "train", casing: str | None = None):
    """One in-context lookup row: k texts about k people (whole biographies, or one-fact texts such as
    "Ga Rus. Works at Zorora.", all of the same attribute when `same_attribute`), then `recalls` recalls
    (one-fact contexts: a text again up to its value) and `questions` questions about a random stored
    fact, or a stranger (answer: unknown). 30% of the people are hard negatives of another one
    (`_similar`: a shared name word, shared facts or both). Returns (ids, lm_targets, answers,
    subjects) as lists; see `LookupBatch`."""
    stranger_share = recipe.stranger_share if stranger_share is None else stranger_share
    people: list[Person] = []
    while len(people) < k:
        person = draw()
        if people and rng.random() < 0.3:
            person = _similar(world, rng, rng.choice(people), person)
        if person.name not in {p.name for p in people}:
            people.append(person)
    attribute = rng.choice(world.attributes)
    facts: list[tuple[Person, str, int]] = []  # (person, attribute, text index)
    ids: list[int] = []
    subjects: list[tuple[int, int] | None] = []
    texts = []
    for j, person in enumerate(people):
        stated = world.attributes if bios else [attribute if same_attribute else rng.choice(world.attributes)]
        text = world.biography(person, rng, attributes=None if bios else stated)
        piece = encode(tokenizer, [text if j == 0 else " " + text], bos=j == 0)[0]
        name = encode(tokenizer, [" " + person.name], bos=False)[0]
        known = _name_end(piece, name)  # the tokens before it cannot know whom the text is about
        subjects += [None] * known + [(name[0], name[-1])] * (len(piece) - known)
        ids += piece
        texts.append(text)
        facts += [(person, a, j) for a in stated]
    lm_targets = ids[1:] + [-100]
    answers = [-100] * len(ids)

    def ask(tokens: list[int], answer: int, subject: tuple[int, int] | None, known: int) -> None:
        subjects.extend([None] * known + [subject] * (len(tokens) - known) + [None])
        ids.extend(tokens + [answer])
        answers.extend([-100] * (len(tokens) - 1) + [answer, -100])
        lm_targets.extend([-100] * (len(tokens) + 1))

    for _ in range(0 if bios else recalls):
        person, a, j = rng.choice(facts)
        tokens = encode(tokenizer, [" " + texts[j]], bos=False)[0]
        value = answer_id(tokenizer, " " + person.attrs[a])
        cut = tokens.index(value)
        ask(tokens[:cut], value, None, cut)
    for _ in range(questions):
        person, a, _j = rng.choice(facts)
        stranger = rng.random() < stranger_share
        if stranger:
            names = {p.name for p in people}
            person = draw()
            while person.name in names:
                person = draw()
        case = casing or ("as_is" if rng.random() >= recipe.casing_share else rng.choice(("upper", "lower")))
        prompt, answer = world.question(person, a, rng, phrasings=phrasings, casing=case, stranger=stranger)
        tokens = encode(tokenizer, [" " + prompt], bos=False)[0]
        name = {"as_is": person.name, "upper": person.name.upper(), "lower": person.name.lower()}[case]
        subject = encode(tokenizer, [" " + person.name], bos=False)[0]
        ask(tokens, answer_id(tokenizer, answer), (subject[0], subject[-1]),
            _name_end(tokens, encode(tokenizer, [" " + name], bos=False)[0]))
    return ids, lm_targets, answers, subjects


def lookup_batch(world: World, recipe: Recipe, tokenizer, rng: random.Random, draw, batch: int, **kw) -> LookupBatch:
    """`batch` lookup rows: a share `stage1_bio_share` of whole biographies (1..4 per context), the rest
    one-fact texts (1..stage1_max_texts, a share `same_attribute_share` all of one attribute)."""
    rows = []
    for _ in range(batch):
        bios = rng.random() < recipe.stage1_bio_share
        k = rng.randint(1, min(4, recipe.stage1_max_texts) if bios else recipe.stage1_max_texts)
        same = rng.random() < recipe.same_attribute_share
        rows.append(lookup_row(world, recipe, tokenizer, rng, draw, k, bios, same, recipe.stage1_questions,
                               recipe.stage1_recalls, **kw))
    return _lookup_tensors(rows, tokenizer)


def _lookup_tensors(rows: list[tuple], tokenizer) -> LookupBatch:
    """`lookup_row` results, right-padded into one batch."""
    ids, lm_targets, answers, subjects = zip(*rows)
    T = max(len(r) for r in ids)
    none = (-100, -100)
    subject_ids = [[none if x is None else x for x in row] + [none] * (T - len(row)) for row in subjects]
    return LookupBatch(pad(list(ids), tokenizer.pad_token_id), pad(list(lm_targets), -100), pad(list(answers), -100),
                       torch.tensor(subject_ids))


def memory_batch(world: World, recipe: Recipe, tokenizer, draw, rng: random.Random, batch: int, n_texts: int,
                 target: int, num_layers: int, N: int, K: int, **kw) -> MemoryBatch:
    """Memory lookup rows (`memory_qa`): B episodes of n_texts texts with the asked biography at
    injection `target` in every row (so that the gradient needs to flow through one injection only),
    and their memory drops."""
    eps = [episode(world, recipe, rng, draw, n_texts, target, **kw) for _ in range(batch)]
    texts = [encode(tokenizer, [ep.texts[i] for ep in eps], bos=False) for i in range(n_texts)]
    prompts = encode(tokenizer, [ep.prompt for ep in eps], bos=False)
    answers = [answer_id(tokenizer, ep.answer) for ep in eps]
    questions = pad([p + [a] for p, a in zip(prompts, answers)], tokenizer.pad_token_id)
    labels = torch.full_like(questions, -100)
    for b, p in enumerate(prompts):
        labels[b, len(p)] = answers[b]
    g = torch.Generator().manual_seed(rng.randrange(1 << 62))
    kept = [kept_rows(num_layers, N, K, g, batch=batch) for _ in range(n_texts)]  # each [B, L, N - K]
    strangers = torch.tensor([ep.target < 0 for ep in eps])
    return MemoryBatch(texts, target, strangers, questions, labels, kept,
                       target_subjects(tokenizer, texts[target], [ep.subject for ep in eps], K))


def target_subjects(tokenizer, rows: list[list[int]], names: list[str], K: int) -> torch.Tensor:
    """Subject labels [B, K, 2] of the K memory rows an injection of `rows` writes: a row's last
    min(len, K) rows are its text's last tokens, labelled (first, last name token) from the end of
    the name on; the rest -100."""
    labels = torch.full((len(rows), K, 2), -100, dtype=torch.long)
    for b, (ids, name) in enumerate(zip(rows, names)):
        name_ids = encode(tokenizer, [" " + name], bos=False)[0]
        known = _name_end(ids, name_ids)
        tail = range(max(known, len(ids) - K), len(ids))
        for t in tail:
            labels[b, K - len(ids) + t] = torch.tensor([name_ids[0], name_ids[-1]])
    return labels


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
        correct.append(memory_qa(model, mb).correct)
    return torch.cat(correct).float().mean().item()


@torch.no_grad()
def lookup_accuracy(model: MemoryModel, world: World, recipe: Recipe, tokenizer, people, seed: int, k: int,
                    bios: bool = False, same_attribute: bool = True, stranger: bool = False,
                    phrasings: str = "train") -> float:
    """Held-out in-context lookup: one question per row after k texts about people from `people`
    (stranger: about someone else, where the right answer is `unknown`)."""
    rng = random.Random(f"lookup:{seed}:{k}:{bios}:{same_attribute}:{stranger}:{phrasings}")
    rows = [lookup_row(world, recipe, tokenizer, rng, lambda: rng.choice(people), k, bios, same_attribute, 1, 0,
                       stranger_share=float(stranger), phrasings=phrasings, casing="as_is") for _ in people]
    return lookup_qa(model, _lookup_tensors(rows, tokenizer), 0.0)[1].float().mean().item()


def lookup_probes(model: MemoryModel, world: World, recipe: Recipe, tokenizer, people, seed: int) -> dict[str, float]:
    """The held-out in-context checks of stage 1: one-fact texts of one attribute (1 and 8 people: only the
    name tells the 8 apart), whole biographies (1, 2 and 4 people), strangers, held-out phrasings."""
    probes = {"facts_k1": dict(k=1), "facts_k8": dict(k=8), "bios_k1": dict(k=1, bios=True),
              "bios_k2": dict(k=2, bios=True), "bios_k4": dict(k=4, bios=True), "stranger_k4": dict(k=4, stranger=True),
              "heldout_phrasing_bios_k2": dict(k=2, bios=True, phrasings="heldout")}
    return {name: round(lookup_accuracy(model, world, recipe, tokenizer, people, seed, **kw), 3)
            for name, kw in probes.items()}


@torch.no_grad()
def in_context_accuracy(model: MemoryModel, world: World, recipe: Recipe, tokenizer, people, seed: int,
                        n: int) -> float:
    """Held-out in-context lookup accuracy with exactly n biographies in the context."""
    cb = context_batch(world, recipe, tokenizer, people, random.Random(f"in-context:{seed}"), len(people), n,
                       min_texts=n, stranger=False, casing="as_is", bio_share=1.0)
    return context_qa(model, cb, 0.0)[1].float().mean().item()


# ---- training: the stages as configurations of the one loop ---------------------------------------

def log(record: dict) -> None:
    print(json.dumps(record), flush=True)


def optimize(model: MemoryModel, recipe: Recipe, lr: float, steps: int, next_batch, loss, on_step,
             ema: EMA | None = None, extra: list[torch.nn.Parameter] | None = None, schedule: str = "cosine",
             stop=None, data: DataHash | None = None):
    """One stage: `fit` in this process (`SingleProcess`, no accelerate) over all the model's weights
    (and `extra`, e.g. the subject head's): AdamW, linear warm-up over `warmup_steps` then cosine decay
    to 10% (or constant), the model's gradients clipped to norm 1, `max_minutes` as a cap, `stop` as a
    gate. The extra weights are not clipped with the model's: the fresh subject head's large early
    gradient would shrink the model's (stage 1 then learned far slower: docs/tinymodel.md)."""
    params = list(model.parameters())
    optimizer, scheduler = make_optimizer(params + list(extra or []), lr, steps, recipe.warmup_steps,
                                          recipe.weight_decay, schedule)
    return fit(SingleProcess(), model, optimizer, scheduler, params, next_batch, loss, end=steps,
               max_minutes=recipe.max_minutes, data=data if data is not None else DataHash(), ema=ema,
               on_step=on_step, stop=stop)


def subject_head(model: MemoryModel, recipe: Recipe) -> SubjectHead:
    """A fresh, seeded subject head for the in-context steps of a stage (dropped after training)."""
    with torch.random.fork_rng():
        torch.manual_seed(recipe.seed + 17)
        return SubjectHead(model.lm.config.hidden_size, model.lm.config.vocab_size, recipe.subject_layer)


def stage1(model: MemoryModel, recipe: Recipe, world: World, tokenizer, draw, eval_people, rng,
           subject: SubjectHead) -> dict:
    """In-context lookup on fresh people (`lookup_batch`): the answer loss on every question and recall,
    the LM loss on the texts and the subject loss; held-out checks every `stage1_eval_every` steps.

    1a: one-fact texts only, at a constant learning rate, until the gate (held-out `facts_k8` ≥
    `stage1_gate`) or `stage1_steps`: when lookup appears varies by thousands of steps from seed to
    seed, and whole biographies or a decaying rate from the start delayed it (docs/tinymodel.md).
    1b: `stage1_bio_steps` more with biographies and name casings joining, cosine decay."""
    t1 = time.time()
    data, summaries, losses = DataHash(), [], []
    last: dict[str, float] = {}

    def on_step_of(phase: str, steps: int):
        def on_step(step: int, loss: float) -> None:
            if step % recipe.stage1_eval_every and step != steps:
                return
            model.eval()
            last.clear()
            last.update(lookup_probes(model, world, recipe, tokenizer, eval_people, seed=step))
            model.train()
            log({"stage": phase, "step": step, "loss": round(loss, 3), "min": round((time.time() - t1) / 60, 1),
                 **last})
        return on_step

    def gate(step: int) -> bool:
        checked = step % recipe.stage1_eval_every == 0
        return bool(recipe.stage1_gate) and checked and last["facts_k8"] >= recipe.stage1_gate

    for phase, phase_recipe, steps, schedule, stop in (
            ("1a", dataclasses.replace(recipe, stage1_bio_share=0.0, casing_share=0.0), recipe.stage1_steps,
             "constant", gate),
            ("1b", recipe, recipe.stage1_bio_steps, "cosine", None)):
        if not steps:
            continue
        result = optimize(model, recipe, recipe.stage1_lr, steps,
                          lambda step, micro, r=phase_recipe: lookup_batch(world, r, tokenizer, rng, draw,
                                                                          recipe.stage1_batch),
                          lambda lb: lookup_qa(model, lb, recipe.context_lm_weight, subject, recipe.subject_weight)[0],
                          on_step_of(phase, steps), extra=list(subject.parameters()), schedule=schedule, stop=stop,
                          data=data)
        summaries.append((phase, result))
        losses += result.losses
        if result.capped_by_minutes:
            break
    return {"steps": sum(r.step for _, r in summaries), **{f"steps_{p}": r.step for p, r in summaries},
            "seconds": round(sum(r.seconds for _, r in summaries)),
            "capped_by_minutes": any(r.capped_by_minutes for _, r in summaries),
            "stopped_by_gate": any(r.stopped for _, r in summaries), "gate_probes": dict(last),
            "data_sha256": data.hexdigest(), "loss": loss_trend(losses)}


def memory_stage(model: MemoryModel, recipe: Recipe, world: World, tokenizer, people, eval_people, rng,
                 draw, lr: float, steps: int, subject: SubjectHead,
                 stage: str) -> tuple[MemoryModel, dict, list[dict]]:
    """Memory training on fresh people (stage 2, or a phase of stage 3 for M+): 1..max_texts texts per
    memory, the asked person's biography at a uniformly random injection, with an
    in-context step every `replay_every`-th step; returns the EMA weights, a summary and the eval
    history (its records labelled `stage`). The summary's loss trend is the answer loss of the memory
    steps."""
    mplus = model.config.kind == "mplus"
    ema = EMA(model, recipe.ema)
    t2, history = time.time(), []
    window: list[tuple[float, float, torch.Tensor | None]] = []  # (loss, accuracy, retriever stats) since the last eval
    answer_losses: list[float] = []  # of the memory steps

    def next_batch(step: int, micro: int) -> LookupBatch | MemoryBatch:
        if recipe.replay_every and step % recipe.replay_every == recipe.replay_every - 1:
            return lookup_batch(world, recipe, tokenizer, rng, lambda: rng.choice(people), recipe.stage1_batch)
        n = rng.randint(1, recipe.max_texts)
        return memory_batch(world, recipe, tokenizer, draw, rng, recipe.batch, n, rng.randrange(n), model.num_layers,
                            model.config.num_memory_tokens, model.config.num_tokens)

    def loss(batch: LookupBatch | MemoryBatch) -> torch.Tensor:
        if isinstance(batch, LookupBatch):
            return lookup_qa(model, batch, recipe.context_lm_weight, subject, recipe.subject_weight)[0]
        qa = memory_qa(model, batch, retriever_weight=recipe.retriever_weight if mplus else 0.0, subject=subject,
                       subject_weight=recipe.memory_subject_weight, recall_weight=recipe.memory_recall_weight)
        window.append((qa.loss.item(), qa.correct.float().mean().item(), qa.retriever))
        answer_losses.append(qa.answer_loss)
        return qa.loss

    def on_step(step: int, _loss: float) -> None:
        nonlocal window
        if step % recipe.eval_every and step != steps:
            return
        rec = {"stage": stage, "step": step, "min": round((time.time() - t2) / 60, 1),
               "train_loss": round(sum(w[0] for w in window) / max(1, len(window)), 3),
               "train_acc": round(sum(w[1] for w in window) / max(1, len(window)), 3)}
        stats = [w[2] for w in window if w[2] is not None]
        if stats:
            total = torch.stack(stats).sum(0).tolist()  # see retriever_loss
            rec["retriever_loss"] = round(total[0] / max(total[1], 1), 4)
            rec["retriever_recall@R"] = round(total[4] / max(total[1], 1), 3)
        window = []
        for name, cond in eval_conditions(mplus).items():
            rec[name] = round(memory_accuracy(ema.model, world, recipe, tokenizer, eval_people, seed=0, **cond), 3)
        rec["in_context_k4"] = round(in_context_accuracy(ema.model, world, recipe, tokenizer, eval_people, 0, 4), 3)
        history.append(rec)
        log(rec)

    result = optimize(model, recipe, lr, steps, next_batch, loss, on_step, ema=ema, extra=list(subject.parameters()))
    return ema.model, {**result.summary(), "loss": loss_trend(answer_losses)}, history


def save_tiny(ema: MemoryModel, tokenizer, out: str | Path, record: dict) -> Path:
    ema.tokenizer = tokenizer
    path = save(ema, out)
    (Path(out) / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_phase(recipe: Recipe) -> Recipe:
    """Stage 2a's episodes: 1-2 texts and no strangers (a model that answered `unknown` to everything
    from memory learned to read it this way, docs/tinymodel.md)."""
    return dataclasses.replace(recipe, max_texts=min(2, recipe.max_texts), stranger_share=0.0)


def trainable(model: MemoryModel) -> MemoryModel:
    """The next phase trains the EMA weights of the one before (what `--init` of its saved model does)."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train()


def memory_phases(model: MemoryModel, recipe: Recipe, world: World, tokenizer, people, eval_people,
                  phases: list[tuple[str, str, Recipe, int]], rng_key: str, draw_seed: int,
                  lr: float) -> tuple[MemoryModel, dict, list[dict]]:
    """Memory-stage phases (name, history label, the phase's recipe, steps) in order, each started
    exactly as a run with `--init` of the model before would start it: the same data streams (`rng_key`,
    `draw_seed`), a fresh subject head and optimizer, the previous phase's EMA weights. Returns the
    last weights, the summaries by name and the history."""
    summaries, history = {}, []
    for name, label, phase, steps in phases:
        if not steps:
            continue
        rng = random.Random(rng_key)
        draw = world.people_stream("train", seed=draw_seed).__next__
        ema, summaries[name], h = memory_stage(model, phase, world, tokenizer, people, eval_people, rng, draw, lr,
                                               steps, subject_head(model, recipe), label)
        model, history = trainable(ema), history + h
    return model, summaries, history


def train_memoryllm(recipe: Recipe, out: str | Path) -> dict:
    """Stages 1 and 2 from scratch, or (with `recipe.init`) stage 2 from a saved tiny MemoryLLM
    model (a stage-1 model, or one to continue); the EMA weights saved to `out`."""
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

    fixed_people = world.people(recipe.stage1_people, "train", seed=recipe.seed)
    eval_people = world.heldout_people(recipe.eval_people, seed=recipe.seed + 1)
    if recipe.init:
        earlier = json.loads((Path(recipe.init) / "recipe.json").read_text())
        s1 = {"earlier_run": {k: earlier.get(k) for k in ("stage1", "stage2_read", "stage2", "command")}}
    else:
        rng = random.Random(f"tinymodel:{recipe.seed}:scratch")
        fresh = world.people_stream("train", seed=recipe.seed + 500).__next__
        s1 = stage1(model, recipe, world, tokenizer, fresh, eval_people, rng, subject_head(model, recipe))
    if recipe.stage1_out and not recipe.init:
        save_tiny(model, tokenizer, recipe.stage1_out,
                  {"recipe": asdict(recipe), "world": asdict(world.config), "stage1": s1,
                   "command": f"memllm recipe tiny --kind memoryllm --seed {recipe.seed} --stage1-out DIR"})
    phases = [("stage2_read", "2a", read_phase(recipe), recipe.stage2_read_steps),
              ("stage2", "2b", recipe, recipe.stage2_steps)]
    model, summaries, history = memory_phases(model, recipe, world, tokenizer, fixed_people, eval_people, phases,
                                              f"tinymodel:{recipe.seed}:continued", recipe.seed + 3000, recipe.lr)
    command = f"memllm recipe tiny --kind memoryllm --seed {recipe.seed}"
    if recipe.init:
        command += f" --init {recipe.init} --stage2-read-steps {recipe.stage2_read_steps}"
    command += f" --stage2-steps {recipe.stage2_steps}"
    record = {"recipe": asdict(recipe), "world": asdict(world.config), "stage1": s1,
              "stage2_read": summaries.get("stage2_read"), "stage2": summaries.get("stage2"), "history": history,
              "command": command}
    path = save_tiny(model, tokenizer, out, record)
    summary = {"event": "saved", "out": str(path), "params": n_params, "stage1": s1, **summaries,
               "total_s": round(time.time() - t0)}
    log(summary)
    return summary


def stage3_phases(recipe: Recipe) -> list[tuple[str, int, int]]:
    """`recipe.mplus_phases` as (label, steps, max texts): labels 3, 3b, 3c, ... Raises ValueError
    naming a malformed phase."""
    phases = []
    for i, spec in enumerate(recipe.mplus_phases):
        try:
            steps, texts = (int(part) for part in spec.split(":"))
        except ValueError:
            raise ValueError(f"--mplus-phases takes STEPS:TEXTS (e.g. 600:100), not {spec!r}") from None
        if steps < 0 or texts < 1:
            raise ValueError(f"--mplus-phases {spec!r}: steps must be >= 0 and texts >= 1")
        phases.append(("3" + ("" if i == 0 else chr(ord("a") + i)), steps, texts))
    return phases


def train_mplus(recipe: Recipe, memoryllm_dir: str | Path, out: str | Path) -> dict:
    """Stage 3: M+ from the trained MemoryLLM model in `memoryllm_dir` (or an M+ model to continue):
    long-term memory read during training (`RowLTM`), the retriever loss; its phases (3, 3b, ...) with
    ever longer memories."""
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
    fixed_people = world.people(recipe.stage1_people, "train", seed=recipe.seed)
    eval_people = world.heldout_people(recipe.eval_people, seed=recipe.seed + 1)
    phases = [(f"stage{label}", label, dataclasses.replace(recipe, max_texts=texts), steps)
              for label, steps, texts in stage3_phases(recipe)]
    model, summaries, history = memory_phases(model, recipe, world, tokenizer, fixed_people, eval_people, phases,
                                              f"tinymodel-mplus:{recipe.seed}", recipe.seed + 2000, recipe.mplus_lr)
    command = f"memllm recipe tiny --kind mplus --init MEMORYLLM_DIR --seed {recipe.seed}"
    command += "".join(f" --mplus-phases {spec}" for spec in recipe.mplus_phases)
    record = {"recipe": asdict(recipe), "world": asdict(world.config), "from": str(memoryllm_dir),
              **{name: summaries.get(name) for name, *_ in phases}, "history": history, "command": command}
    path = save_tiny(model, tokenizer, out, record)
    summary = {"event": "saved", "out": str(path), "params": n_params, **summaries, "total_s": round(time.time() - t0)}
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
