"""The synthetic world and its tokenizer: determinism, the held-out split, token budgets."""

from __future__ import annotations

import itertools
import random
import re

import pytest
from transformers import AutoTokenizer

from memllm.synthetic.tokenizer import train_world_tokenizer, value_token_ids
from memllm.synthetic.world import ATTRIBUTES, BIO_STYLES, TextSnippets, World, WorldConfig

ENGLISH = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
    "season of Light, it was the season of Darkness, it was the spring of hope."
)


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig(seed=0), snippets=TextSnippets([ENGLISH]))


@pytest.fixture(scope="module")
def tok(world: World):
    return train_world_tokenizer(world, extra_texts=[ENGLISH], n_docs=3000, seed=0)


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_same_seed_same_world() -> None:
    a, b = World(WorldConfig(seed=3)), World(WorldConfig(seed=3))
    assert a.all_values() == b.all_values()
    assert a.people(50, seed=7) == b.people(50, seed=7)
    ra, rb = random.Random(1), random.Random(1)
    pa = a.people(20, seed=7)
    assert [a.biography(p, ra) for p in pa] == [b.biography(p, rb) for p in pa]
    assert list(a.corpus(30, seed=2)) == list(b.corpus(30, seed=2))
    assert a.people(50, seed=8) != a.people(50, seed=7)
    assert World(WorldConfig(seed=4)).values("birth_city") != a.values("birth_city")


def test_values_single_words_and_unique() -> None:
    world = World()
    values = world.all_values()
    assert len(values) == len(set(values))
    assert all(v.isalnum() for v in values)
    assert set(world.attributes) == set(ATTRIBUTES)


def test_heldout_disjoint_from_long_train_stream(world: World) -> None:
    heldout = world.heldout_people(500, seed=0)
    assert len({p.name for p in heldout}) == 500
    assert all(world.split_of(p.name) == "heldout" for p in heldout)
    held_names = {p.name for p in heldout}
    for seed in (0, 1):
        train = itertools.islice(world.people_stream("train", seed=seed), 20_000)
        assert not any(p.name in held_names for p in train)
    # The split is a pure function of the name and holds about a tenth of all names.
    share = sum(world.split_of(f"Name {i}") == "heldout" for i in range(10_000)) / 10_000
    assert 0.08 < share < 0.12


def test_questions_match_attributes(world: World) -> None:
    rng = random.Random(0)
    for person in world.people(100, seed=5):
        for attribute in world.attributes:
            prompt, answer = world.question(person, attribute, rng)
            assert prompt.startswith("Q: ") and prompt.endswith(" A:")
            assert person.name in prompt
            assert answer == " " + person.attrs[attribute]


def test_biographies_state_every_fact(world: World) -> None:
    rng = random.Random(0)
    for person in world.people(100, seed=6):
        for style in BIO_STYLES:
            bio = world.biography(person, rng, style=style)
            words = set(bio.replace(",", " ").replace(".", " ").replace(":", " ").split())
            assert bio.startswith(person.name)
            assert set(person.attrs.values()) <= words


def test_distractors_mention_no_values(world: World) -> None:
    rng = random.Random(0)
    values = set(world.all_values())
    kinds = set()
    for _ in range(300):
        text = world.distractor(rng)
        kinds.add("english" if text in ENGLISH else "synthetic")
        if text not in ENGLISH:
            assert not values & set(text.rstrip(".").split())
    assert kinds == {"english", "synthetic"}
    assert World().distractor(random.Random(1)) == World().distractor(random.Random(1))


def test_biography_budget_and_subset(world: World) -> None:
    rng = random.Random(0)
    person = world.people(1, seed=9)[0]
    short = world.biography(person, rng, attributes=["pet", "job"], max_tokens=12)
    assert world.token_bound(short) <= 12
    assert person.attrs["pet"] in short and person.attrs["birth_city"] not in short
    with pytest.raises(ValueError):
        world.biography(person, rng, max_tokens=15)


def test_bios_within_token_budget(world: World, tok) -> None:
    rng = random.Random(0)
    budget = world.config.bio_max_tokens
    lengths = []
    for person in world.people(500, seed=11):
        bio = world.biography(person, rng)
        n = n_tokens(tok, bio)
        assert n <= world.token_bound(bio) <= budget, bio
        lengths.append(n)
    assert min(lengths) < max(lengths)  # phrasings vary


def test_every_answer_is_one_token(world: World, tok) -> None:
    ids = value_token_ids(tok, world)  # raises if any value is not one token
    assert sum(len(v) for v in ids.values()) == len(world.all_values())
    rng = random.Random(0)
    for person in world.people(50, seed=12):
        for attribute in world.attributes:
            prompt, answer = world.question(person, attribute, rng)
            full = tok(prompt + answer)["input_ids"]
            assert full == tok(prompt)["input_ids"] + tok(answer, add_special_tokens=False)[
                "input_ids"
            ]
            assert full[-1] == ids[attribute][person.attrs[attribute]]


def test_names_compact(world: World, tok) -> None:
    for person in world.people(300, seed=13):
        assert n_tokens(tok, person.name) <= world.token_bound(person.name) <= 6


def test_tokenizer_deterministic(world: World, tok) -> None:
    again = train_world_tokenizer(world, extra_texts=[ENGLISH], n_docs=3000, seed=0)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert len(tok) == 1024


def test_tokenizer_roundtrip_through_autotokenizer(world: World, tok, tmp_path) -> None:
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == (
        "<bos>", "<eos>", "<pad>", "<unk>",
    )
    texts = list(world.corpus(40, seed=21)) + [ENGLISH]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert loaded(text)["input_ids"] == ids
        assert ids[0] == tok.bos_token_id
        assert tok.unk_token_id not in ids
        assert loaded.decode(ids, skip_special_tokens=True) == text
    batch = loaded(texts[:4], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 4


def test_question_sets_casings_and_strangers():
    from memllm.synthetic.world import _CLAUSES, _HELDOUT_QUESTIONS, _QUESTIONS, ABSTAIN

    world = World(WorldConfig(seed=0))
    person = world.people(1, "train", seed=0)[0]
    rng = random.Random(0)
    for attribute in world.attributes:  # held-out phrasings are never training phrasings
        assert not set(_HELDOUT_QUESTIONS[attribute]) & set(_QUESTIONS[attribute])
        trained = {world.question(person, attribute, rng)[0] for _ in range(50)}
        heldout = {world.question(person, attribute, rng, phrasings="heldout")[0] for _ in range(50)}
        assert not trained & heldout
    prompt, answer = world.question(person, "pet", rng, casing="upper")
    assert person.name.upper() in prompt and answer == " " + person.attrs["pet"]
    prompt, _ = world.question(person, "pet", rng, casing="lower")
    assert person.name.lower() in prompt
    assert world.question(person, "pet", rng, stranger=True)[1] == " " + ABSTAIN
    with pytest.raises(ValueError, match="phrasings"):
        world.question(person, "pet", rng, phrasings="other")
    # every held-out question word occurs in training text (no untrained embedding); only phrasings are new
    trained_words = {w.lower() for ts in [*_CLAUSES.values(), *_QUESTIONS.values()] for t in ts
                     for w in re.findall(r"[A-Za-z]+", t)}
    for templates in _HELDOUT_QUESTIONS.values():
        for t in templates:
            assert {w.lower() for w in re.findall(r"[A-Za-z]+", t)} <= trained_words, t
