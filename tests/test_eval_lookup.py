"""The lookup panels of `memllm eval retention`, `memllm eval integrity` and the demo.

The panels are checked with rule-based fake models whose every metric is known: a model that reads the
asked person's biography scores 1 everywhere; one that always answers from the first biography in
memory gets position 1 right and the rest wrong with another stored person's value (what the shipped
models do); one that always says "unknown" abstains on every stranger and answers nobody. A metric a
shortcut could satisfy fails at least one of them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from memllm.core.tiny import random_model
from memllm.eval import retention as evaluate
from memllm.eval.common import stm_capacity, world_for
from memllm.eval.integrity import integrity
from memllm.synthetic.world import _HELDOUT_QUESTIONS, _QUESTIONS, ABSTAIN, World, WorldConfig

WORLD = World(WorldConfig(first_name_syllables=(1, 1), last_name_syllables=(1, 2)))
BIO = re.compile(r"^([A-Z][a-z]+ [A-Z][a-z]+)[:.]")
QUESTIONS = [(a, re.compile("^Q: " + re.escape(t).replace(re.escape("{n}"), "(.+?)") + " A:$"))
             for table in (_QUESTIONS, _HELDOUT_QUESTIONS) for a, templates in table.items() for t in templates]


def parse_question(prompt: str) -> tuple[str, str]:
    """(name as written, attribute) of a world question."""
    for attribute, pattern in QUESTIONS:
        if m := pattern.match(prompt):
            return m.group(1), attribute
    raise AssertionError(f"not a world question: {prompt}")


def read_bio(text: str, attribute: str) -> tuple[str, str] | None:
    """(name, value of attribute) of a biography, None for any other text."""
    m = BIO.match(text)
    if m is None:
        return None
    values = [w for w in re.findall(r"[A-Za-z0-9]+", text) if w in WORLD.values(attribute)]
    assert len(values) == 1, text
    return m.group(1), values[0]


def oracle(memory: list[str], name: str, attribute: str) -> str:
    for text in memory:
        bio = read_bio(text, attribute)
        if bio and bio[0].lower() == name.lower():
            return bio[1]
    return ABSTAIN


def first_bio(memory: list[str], name: str, attribute: str) -> str:
    bios = [b for b in (read_bio(t, attribute) for t in memory) if b]
    return bios[0][1] if bios else ""


def last_bio(memory: list[str], name: str, attribute: str) -> str:
    bios = [b for b in (read_bio(t, attribute) for t in memory) if b]
    return bios[-1][1] if bios else ""


def always_unknown(memory: list[str], name: str, attribute: str) -> str:
    return ABSTAIN


class FakeModel:
    """The parts of a memory model the evaluation uses; a memory is the list of texts written into it
    and answers follow `rule(memory, name, attribute)`."""

    def __init__(self, rule, kind: str = "memoryllm", K: int = 32, N: int = 256) -> None:
        self.rule = rule
        self.config = SimpleNamespace(kind=kind, num_tokens=K, num_memory_tokens=N, drop_memory_per_layer=True)
        self.tokenizer = object()
        self.training = True

    def eval(self):
        self.training = False
        return self

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def new_memory(self) -> list[str]:
        return []

    def inject(self, memory: list[str], text: str, drop=None) -> int:
        memory.append(text)
        return 1

    def ask(self, memory: list[str], prompts: list[str], max_new_tokens: int, chat: bool) -> list[str]:
        return [" " + self.rule(memory, *parse_question(p)) + "." for p in prompts]


def test_the_fake_reads_every_biography_and_question_of_the_world():
    import random

    rng = random.Random(0)
    for person in WORLD.heldout_people(20, seed=1):
        bio = WORLD.biography(person, rng)
        for a in WORLD.attributes:
            assert read_bio(bio, a) == (person.name, person.attrs[a])
            for phrasings in ("train", "heldout"):
                prompt, _ = WORLD.question(person, a, rng, phrasings=phrasings, casing="upper")
                assert parse_question(prompt) == (person.name.upper(), a)


def run(rule, kind="memoryllm", **kw):
    model = FakeModel(rule, kind)
    kw = {"n_people": 8, "ks": (1, 4, 8), "befores": (1, 4), "one_then": 12} | kw
    return model, evaluate.lookup(model, WORLD, **kw)


def test_a_model_that_reads_the_asked_person_scores_one_everywhere():
    model, r = run(oracle, kind="mplus")
    assert model.training  # evaluated in eval mode, given back in the mode it came in
    for k, cell in r["people"].items():
        assert cell["all"]["acc"] == 1 and cell["all"]["other_value_rate"] == 0
        assert [p["acc"] for p in cell["positions"]] == [1.0] * k
        assert cell["all"]["n"] == math.ceil(8 / k) * k * len(WORLD.attributes)
    assert all(c["acc"] == 1 for c in r["before"].values())
    assert r["one_then"]["acc"] == 1
    # strangers were never written into the memory they are asked about
    assert r["strangers"]["abstain_rate"] == 1 and r["strangers"]["other_value_rate"] == 0
    assert r["strangers"]["n"] >= 8 * len(WORLD.attributes)
    assert r["heldout"]["acc"] == 1 and r["upper"]["acc"] == 1
    s = evaluate.lookup_summary("mplus", r)
    assert s["mplus_k8_mean"] == s["mplus_k8_min_position"] == s["mplus_heldout_template_ratio"] == 1
    assert s["mplus_stranger_abstain_rate"] == 1 and s["mplus_stranger_stored_value_rate"] == 0
    assert s["mplus_one_then_12"] == 1 and s["mplus_before4"] == 1


def test_a_model_that_answers_from_the_first_biography_is_right_at_position_one_only():
    _, r = run(first_bio)
    for k, cell in r["people"].items():
        accs = [p["acc"] for p in cell["positions"]]
        assert accs[0] == 1
        if k > 1:
            assert max(accs[1:]) < 0.35  # right only where a value coincides with the first person's
            # every wrong answer is the first person's value: another stored person's
            assert cell["all"]["other_value_rate"] == pytest.approx(1 - cell["all"]["acc"])
            assert cell["all"]["acc"] == pytest.approx(sum(accs) / k)
    assert r["strangers"]["abstain_rate"] == 0 and r["strangers"]["other_value_rate"] == 1
    assert all(c["acc"] == 1 for c in r["before"].values())  # distractors hold no biography
    s = evaluate.lookup_summary("memoryllm", r)
    assert s["memoryllm_k8_min_position"] < 0.35 < s["memoryllm_k8_positions"][0]


def test_a_model_that_answers_from_the_newest_biography_is_right_at_the_last_position_only():
    _, r = run(last_bio, kind="mplus")
    accs = [p["acc"] for p in r["people"][8]["positions"]]
    assert accs[-1] == 1 and max(accs[:-1]) < 0.35  # position 1 is the oldest
    assert r["one_then"]["acc"] < 0.35
    assert r["one_then"]["other_value_rate"] == pytest.approx(1 - r["one_then"]["acc"])


def test_a_model_that_always_abstains_answers_nobody():
    _, r = run(always_unknown)
    assert all(c["all"]["acc"] == 0 for c in r["people"].values())
    assert r["strangers"]["abstain_rate"] == 1 and r["strangers"]["other_value_rate"] == 0
    s = evaluate.lookup_summary("memoryllm", r)
    assert s["memoryllm_k4_mean"] == 0 and s["memoryllm_heldout_template_ratio"] is None


def test_single_panel_and_compare_with_fakes(tmp_path, capsys):
    models = {"memoryllm": FakeModel(first_bio), "mplus": FakeModel(oracle, kind="mplus")}
    out = evaluate.compare(models, WORLD, plot=tmp_path / "r.png", n_people=4, distractor_counts=(0, 4),
                           ks=(1, 4), befores=(2,), one_then=6)
    s = out["summary"]
    assert s["memoryllm_acc_at_0"] == 1 and s["memoryllm_floor"] == 0 and s["mplus_gain_at_3x"] == 0
    assert s["memoryllm_k4_positions"][0] == 1 and s["mplus_k4_positions"] == [1, 1, 1, 1]
    assert "mplus_one_then_6" in s and "memoryllm_one_then_6" not in s  # an M+ panel
    assert (tmp_path / "r.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "k people in one memory" in printed and "strangers" in printed
    json.dumps(s)


def test_panels_can_be_chosen():
    model = FakeModel(oracle)
    r = evaluate.lookup(model, WORLD, n_people=4, panels=("strangers",))
    assert set(r) == {"strangers"}
    assert evaluate.lookup_summary("m", r) == {"m_stranger_abstain_rate": 1.0, "m_stranger_stored_value_rate": 0.0}


# ---- M+ provenance ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mplus():
    return random_model(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=2, intermediate_size=64,
                        num_tokens=8, num_blocks=4, num_ltm_blocks=2, kind="mplus", decay_frequency=0.0,
                        update_ltm_frequency=2).eval()


def test_provenance_names_the_injection_of_every_row(mplus):
    """Every row of the pool, the long-term memory and its cache maps to the injection that wrote it:
    K rows per layer per injection, and the N rows of the initial pool to -1."""
    import random

    rng = random.Random(0)
    memory, provenance = mplus.new_memory(), evaluate.Provenance()
    K, N = stm_capacity(mplus)
    texts = [WORLD.distractor(rng)[:60] for _ in range(9)]  # 60 bytes: several updates each (chunks of 2K)
    updates = [provenance.inject(mplus, memory, text, i) for i, text in enumerate(texts)]
    assert min(updates) > 1
    for l, st in enumerate(memory.ltm.layers):
        rows = torch.cat([memory.pool[l], st.vectors, st.cache_vectors])
        sources = provenance.source(l, rows)
        counts = {s: sources.count(s) for s in set(sources)}
        assert counts == {-1: N} | {i: K * updates[i] for i in range(len(texts))}


def test_retrieval_precision_matches_a_direct_comparison_of_rows(mplus):
    """Hits counted by row bytes equal hits counted with torch.equal against each injection's rows."""
    import random

    from memllm.core.generate import encode_prompt

    rng = random.Random(1)
    memory, provenance = mplus.new_memory(), evaluate.Provenance()
    K, _ = stm_capacity(mplus)
    people = WORLD.heldout_people(10, seed=2)
    written = []
    for i, person in enumerate(people):
        assert provenance.inject(mplus, memory, WORLD.biography(person, rng)[:30], i) == 1
        written.append(memory.pool[:, -K:].clone())
    prompts = [WORLD.question(p, "pet", rng)[0] for p in people]
    owners = list(range(len(people)))
    hits, total, chance = evaluate.retrieval_precision(mplus, memory, prompts, owners, provenance)

    enc = encode_prompt(mplus, prompts, chat=False)
    trace: list = []
    with torch.no_grad():
        mplus(enc["input_ids"], memory, enc["attention_mask"], retrievals=trace)
    expected = 0
    for l, results in trace:
        for owner, r in zip(owners, results):
            for row in memory.ltm.layers[l].rows(r.order):
                expected += any(torch.equal(row, w) for w in written[owner][l])
    R = mplus.config.num_retrieved
    assert total == len(prompts) * mplus.num_layers * R and hits == expected
    assert 0 < chance < total


def test_people_in_memory_reports_m_plus_retrieval_precision(mplus):
    r = evaluate.people_in_memory(mplus, WORLD, k=8, n_people=8, trace=True)
    retrieval = r["retrieval"]
    assert retrieval["rows"] == 8 * len(WORLD.attributes) * mplus.num_layers * mplus.config.num_retrieved
    assert 0 <= retrieval["precision"] <= 1 and 0 < retrieval["chance"] < 1


# ---- worlds, integrity, the command line, the demo --------------------------------------------------


def test_a_checkpoint_is_evaluated_on_the_world_its_recipe_names(tmp_path):
    from memllm.core.checkpoint import save

    path = save(random_model(), tmp_path / "ckpt")
    assert world_for(path, world_seed=3).config == WorldConfig(seed=3)
    (path / "recipe.json").write_text(json.dumps({"recipe": {}, "world": dataclasses.asdict(WORLD.config)}))
    world = world_for(path, world_seed=3)
    assert world.config == WORLD.config and world.config.first_name_syllables == (1, 1)


def test_integrity_counts_non_finite_rows_and_measures_recall():
    model = random_model(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=2, intermediate_size=64)
    seen: list[dict] = []
    r = integrity(model, WORLD, updates=50, points=5, recall_people=2, texts=16, on_checkpoint=seen.append)
    assert r["nan_count"] == 0 and r["updates_per_s"] > 0
    assert seen == r["checkpoints"]  # each reported as it was measured
    # checkpoints at 0, 1, 10, 20, ..., 50 updates or just past (a long text is several updates)
    marks = [c["update"] for c in r["checkpoints"]]
    assert marks[0] == 0 and len(marks) == 7 and marks == sorted(marks) and 50 <= r["updates"] == marks[-1] < 60
    for c in r["checkpoints"]:
        assert len(c["norm_mean"]) == 2 and all(0 < m <= x for m, x in zip(c["norm_mean"], c["norm_max"]))
        assert c["recall_n"] == 2 * len(WORLD.attributes) and c["nonfinite_in_pool"] == 0
    assert r["recall_drop"] == pytest.approx(r["recall_start"] - r["recall_end"])

    inject = model.inject

    def poisoned(memory, context, progress=None, **kw):  # every update writes one NaN
        def write_nan(done, total):
            memory.pool = memory.pool.clone()
            memory.pool[0, -1, 0] = float("nan")
            if progress is not None:
                progress(done, total)

        return inject(memory, context, progress=write_nan, **kw)

    model.inject = poisoned
    r = integrity(model, WORLD, updates=1, points=1, recall_people=1, texts=4)
    # at least the one NaN of each update (later chunks of a text read it and spread it)
    assert r["nan_count"] >= r["updates"] >= 1 and r["checkpoints"][-1]["nonfinite_in_pool"] >= 1


def test_eval_integrity_command_ends_with_json(tmp_path):
    from typer.testing import CliRunner

    from memllm.core.checkpoint import save
    from memllm.cli import app

    path = save(random_model(), tmp_path / "ckpt")
    r = CliRunner().invoke(app, ["eval", "integrity", str(path), "--updates", "5", "--points", "1",
                                 "--recall-people", "1", "--plot", str(tmp_path / "i.png")])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["nan_count"] == 0 and summary["updates"] >= 5
    assert {"recall_start", "recall_end", "recall_drop", "norm_mean_end", "norm_max", "updates_per_s"} <= set(summary)
    assert (tmp_path / "i.png").stat().st_size > 10_000


def test_eval_commands_fail_with_one_line_errors(tmp_path):
    from typer.testing import CliRunner

    from memllm.cli import app

    for argv, code in ((["retention", str(tmp_path / "missing")], 1), (["integrity", str(tmp_path / "missing")], 1),
                       (["retention", "--panels", "people,typo"], 2), (["retention", "--counts", "1,x"], 2),
                       (["retention", "--dtype", "float8"], 2), (["integrity", "--updates", "0"], 2)):
        r = CliRunner().invoke(app, ["eval", *argv])
        assert r.exit_code == code, (argv, r.output)
        err = r.stderr.strip().splitlines()
        assert err[-1].startswith("error:") and "Traceback" not in r.output, (argv, r.output)


def test_the_demo_puts_everyone_in_one_memory_and_asks_a_stranger(tmp_path):
    from rich.console import Console

    from memllm.demo import run_demo

    log = tmp_path / "log"
    with open(log, "w") as f:
        result = run_demo(Console(file=f, width=200), tmp_path)
    text = log.read_text()
    assert result["identical_after_reload"] is True
    assert result["people"] >= 4 and result["questions"] == 2 * result["people"]
    assert result["distractors"] == 24 and "unknown" in text
    for key in ("memoryllm", "mplus", "memoryllm_after", "mplus_after", "floor"):
        assert 0 <= result[key] <= result["questions"]
    assert result["stranger_questions"] == 2
    assert 0 <= result["memoryllm_abstained"] <= 2 and 0 <= result["mplus_abstained"] <= 2
