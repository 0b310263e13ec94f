"""Shared test fixtures: the golden vectors (MEMLLM_GOLDEN_DIR or tests/golden) and tiny random models."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

torch.set_num_threads(2)

GOLDEN_DIR = Path(os.environ.get("MEMLLM_GOLDEN_DIR") or Path(__file__).parent / "golden")


@dataclass
class Golden:
    """One family of recorded vectors: golden.json, the recorded tensors and the checkpoint path."""

    name: str
    path: Path
    meta: dict
    tensors: dict[str, torch.Tensor]

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    @property
    def kind(self) -> str:
        return self.meta["config_summary"]["kind"]

    def ids(self, name: str) -> torch.Tensor:
        return torch.tensor(self.meta["inputs"][name])

    def tol(self, category: str) -> dict:
        t = self.meta["tolerances"][category]
        return {"atol": t["atol"], "rtol": t["rtol"]}

    def assert_close(self, name: str, actual: torch.Tensor, category: str) -> None:
        expected = self.tensors[name]
        assert tuple(actual.shape) == tuple(expected.shape), f"{self.name}:{name} shape {tuple(actual.shape)}"
        diff = (actual.detach().float() - expected.float()).abs().max().item()
        assert torch.allclose(actual.detach().float(), expected.float(), **self.tol(category)), (
            f"{self.name}:{name} differs by {diff:.3g} (tolerance {self.tol(category)})"
        )


def golden_families(kind: str) -> list[str]:
    if not GOLDEN_DIR.is_dir():
        return []
    names = []
    for d in sorted(GOLDEN_DIR.iterdir()):
        meta = d / "golden.json"
        if meta.is_file() and json.loads(meta.read_text())["config_summary"]["kind"] == kind:
            names.append(d.name)
    return names


@lru_cache(maxsize=None)
def load_golden(name: str) -> Golden:
    path = GOLDEN_DIR / name
    return Golden(name, path, json.loads((path / "golden.json").read_text()), load_file(path / "tensors.safetensors"))


def check_recorded(g: Golden, ours: dict[str, torch.Tensor], prefix: str, category) -> int:
    """Compare every recorded tensor whose name starts with prefix; returns how many.

    category(name) names the tolerance class of a float tensor; integer tensors must be equal."""
    names = [n for n in g.tensors if n.startswith(prefix)]
    for name in names:
        assert name in ours, f"{g.name}: recorded tensor {name} was not reproduced"
        if g.tensors[name].dtype == torch.int64:
            assert torch.equal(ours[name].long(), g.tensors[name]), f"{g.name}:{name} differs"
        else:
            g.assert_close(name, ours[name], category(name))
    return len(names)


def assert_checkpoint_round_trip(g: Golden, out_dir: Path) -> None:
    """Every checkpoint key is consumed, and saving writes back the same keys and shapes and a model
    that reads identically."""
    from safetensors import safe_open

    import memllm

    model = memllm.load(g.checkpoint)
    out = memllm.save(model, out_dir)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        saved = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    assert saved == {k: v["shape"] for k, v in g.meta["checkpoint_keys"].items()}
    again = memllm.load(out)
    ids = g.ids("prompt_b1")
    with torch.no_grad():
        assert torch.equal(model(ids, model.new_memory()).logits, again(ids, again.new_memory()).logits)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; each train() in a test may ask for another precision."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def distinct_documents(n: int, length: int, seed: int, letters: int = 3) -> list[str]:
    """Documents `s s` where s uses 3 letters of 62: a document's rows and its continuation share
    tokens that other documents rarely have, so which memory rows are related is learnable."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        chars = rng.sample(ALPHABET, letters)
        s = "".join(rng.choice(chars) for _ in range(length))
        docs.append(s + s)
    return docs


def replay_history(model, store, tenant: str, memory_id: str):
    """A fresh memory with a served memory's recorded history applied in its recorded order, each update's
    drops drawn from its id as the server draws them: what the stored memory must equal if no write was
    lost or applied twice."""
    from memllm.serve.worker import seeded_drop

    replay = model.new_memory()
    for h in sorted(store.history(tenant, memory_id), key=lambda h: (h["version"], h["seq"])):
        model.inject(replay, h["text"], drop=seeded_drop(model, h["id"]))
    return replay
