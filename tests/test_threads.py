"""One MemoryModel shared between threads (issue 10, item 9), inference without an autograd graph
(item 3) and the model-level limits on what a call may ask for (item 8)."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import pytest
import torch

import memllm
from memllm.core.inject import RandomDrop
from memllm.core.tiny import random_model

ROUNDS = 4


def _in_threads(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Run the jobs at once, one thread each, started together; their results, or the first error."""
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def work(i: int) -> None:
        try:
            start.wait()
            results[i] = jobs[i]()
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _one_after_another(jobs: list[Callable[[], Any]]) -> list[Any]:
    """The same jobs run sequentially, each on its own thread (so thread-level settings match)."""
    return [_in_threads([job])[0] for job in jobs]


def _filled(model, seed: int, updates: int = 4, length: int = 40):
    memory = model.new_memory()
    g = torch.Generator().manual_seed(seed)
    vocab = min(200, model.lm.config.vocab_size)
    for _ in range(updates):
        model.inject(memory, torch.randint(4, vocab, (length,), generator=g),
                     drop=RandomDrop(generator=torch.Generator().manual_seed(seed)))
    return memory


def _jobs(model, written, read: list) -> list[Callable[[], Any]]:
    """A writer injecting into `written` again and again, and readers asking, streaming and running
    forward on the untouched memories `read`."""
    g = torch.Generator().manual_seed(7)
    vocab = min(200, model.lm.config.vocab_size)
    words = "the river city was born in year old music new a of".split()
    texts = [" ".join(words[i] for i in torch.randint(0, len(words), (30,), generator=g)) for _ in range(ROUNDS)]
    ids = torch.randint(4, vocab, (1, 12), generator=g)

    def writer() -> torch.Tensor:
        memory = written.fork()
        drop = RandomDrop(generator=torch.Generator().manual_seed(1))
        for text in texts:
            model.inject(memory, text, drop=drop)
        return memory.pool.clone()

    def reader(memory) -> Callable[[], list]:
        def job() -> list:
            out = []
            for i in range(ROUNDS):
                with torch.no_grad():
                    out.append(model(ids, memory).logits)
                out.append(model.ask(memory, ["What happened?", "Who was born where, and when?"], max_new_tokens=6))
                if i == 0:
                    out.append("".join(model.stream(memory, "Where?", max_new_tokens=4)))
            return out
        return job

    return [writer] + [reader(m) for m in read]


def _assert_same(expected: list, actual: list) -> None:
    for e, a in zip(expected, actual, strict=True):
        if isinstance(e, torch.Tensor):
            assert torch.equal(e, a)
        elif isinstance(e, list):
            _assert_same(e, a)
        else:
            assert e == a


@pytest.mark.parametrize("name", ["tiny-memoryllm", "tiny-mplus", "lora"])
def test_concurrent_reads_and_an_injection_give_the_sequential_results(name: str) -> None:
    """While one thread injects into memory A, others ask / stream / read memories B and C: every
    result is the one they give one after another (injection hooks, M+ retrieval hooks, the LoRA
    adapter and the tokenizer are shared by the threads)."""
    model = random_model(lora_rank=4, seed=5) if name == "lora" else memllm.load(name)
    a, b, c = (_filled(model, seed) for seed in (1, 2, 3))
    if name == "tiny-mplus":
        assert all(st.num_ltm > 0 for st in b.ltm.layers)  # the readers really retrieve
    jobs = _jobs(model, a, [b, c])
    expected = _one_after_another(jobs)
    for _ in range(2):
        _assert_same(expected, _in_threads(jobs))


def test_hooks_of_one_thread_do_not_fire_in_another() -> None:
    model = random_model(seed=6)
    memory = model.new_memory()
    ids = torch.tensor([[5, 6, 7, 8]])
    seen: list[str] = []
    inside, done = threading.Event(), threading.Event()

    def hook_for(l: int):
        def hook(module, args, kwargs):
            seen.append(threading.current_thread().name)
        return hook

    def other() -> None:
        with model.layer_hooks(pre=hook_for):
            inside.set()
            done.wait(10)
            with torch.no_grad():
                model(ids, memory)

    thread = threading.Thread(target=other, name="other")
    thread.start()
    inside.wait(10)
    with torch.no_grad():
        model(ids, memory)  # another thread's hooks are installed: they must not run here
    done.set()
    thread.join()
    assert seen == ["other"] * model.num_layers


class _SlowBackend:
    """A fast tokenizer's Rust backend that pauses inside encode_batch: widens the window in which
    another thread can change the padding settings the backend keeps for every caller."""

    def __init__(self, backend, started: threading.Event) -> None:
        object.__setattr__(self, "_backend", backend)
        object.__setattr__(self, "_started", started)

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._backend, name, value)

    def encode_batch(self, *args, **kwargs):
        self._started.set()
        time.sleep(0.3)
        return self._backend.encode_batch(*args, **kwargs)


def test_a_question_is_tokenized_whole_while_another_thread_injects_text() -> None:
    """Padding is backend state of the shared tokenizer: an injection (no padding) must not change
    it under a batch of questions being encoded (left padding)."""
    model = random_model(seed=11)
    memory, other = model.new_memory(), model.new_memory()
    questions = ["What happened?", "Who was born where, and when?"]
    expected = _in_threads([lambda: model.ask(memory, questions, max_new_tokens=4)])[0]
    tok, started = model.tokenizer, threading.Event()
    backend = tok._tokenizer
    tok._tokenizer = _SlowBackend(backend, started)

    def inject() -> int:
        assert started.wait(10)  # the questions are being encoded
        return model.inject(other, "the river city was born in the year of the old music")

    try:
        answers, _ = _in_threads([lambda: model.ask(memory, questions, max_new_tokens=4), inject])
    finally:
        tok._tokenizer = backend
    assert answers == expected


def test_reads_share_the_adapter_and_an_injection_takes_its_turn() -> None:
    """Two reads (decoder adapter) run together; an injection (encoder adapter) waits until they are
    done, and a read arriving meanwhile waits behind it instead of starving it."""
    from peft.tuners.lora import LoraLayer

    model = random_model(lora_rank=4, seed=10)
    lora = next(m for m in model.lm.modules() if isinstance(m, LoraLayer))
    entered: list[tuple[str, list[str]]] = []
    inside = {name: threading.Event() for name in ("read1", "read2", "inject", "read3")}
    release = threading.Event()

    def call(name: str, role: str, wait: bool) -> threading.Thread:
        def run() -> None:
            with model.adapter(role):
                entered.append((name, list(lora.active_adapters)))
                inside[name].set()
                if wait:
                    release.wait(10)
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    threads = [call("read1", "decoder", True)]
    assert inside["read1"].wait(10)
    threads.append(call("read2", "decoder", True))
    assert inside["read2"].wait(10)  # entered while read1 is still inside
    threads.append(call("inject", "encoder", False))
    assert not inside["inject"].wait(0.3)  # the reads are using the decoder adapter
    threads.append(call("read3", "decoder", False))
    assert not inside["read3"].wait(0.3)  # queued behind the waiting injection
    release.set()
    for t in threads:
        t.join(10)
    assert entered[2:] == [("inject", ["default"]), ("read3", ["decoder_adapter"])]
    assert entered[0][1] == entered[1][1] == ["decoder_adapter"]
    assert lora.active_adapters == ["default"]  # no call running: the default adapter, as before


# ---- no autograd graph at inference ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memoryllm", "mplus"])
def test_injection_keeps_no_graph(kind: str) -> None:
    model = random_model(kind=kind, num_blocks=6, num_ltm_blocks=2 if kind == "mplus" else 0, lora_rank=4)
    assert torch.is_grad_enabled() and model.bos_embedding.requires_grad
    memory = model.new_memory()
    for i in range(4):
        model.inject(memory, list(range(20 + i, 60 + i)))
    assert memory.pool.grad_fn is None and not memory.pool.requires_grad
    if kind == "mplus":
        assert not any(st.vectors.requires_grad for st in memory.ltm.layers)


def test_generation_builds_no_graph() -> None:
    """The memory prefix of generate / ask / stream is computed without gradients (the differentiable
    read is `model(...)` / `forward_pools`, for training)."""
    model = random_model(seed=8)
    memory = model.new_memory()
    grad_modes: list[bool] = []
    handle = model.layers[0].self_attn.k_proj.register_forward_hook(
        lambda module, args, output: grad_modes.append(torch.is_grad_enabled()))
    try:
        model.generate(memory, torch.tensor([[5, 6, 7]]), max_new_tokens=2)
        model.ask(memory, "who?", max_new_tokens=2)
        "".join(model.stream(memory, "where?", max_new_tokens=2))
    finally:
        handle.remove()
    assert grad_modes and not any(grad_modes)
    model.clear_prefix_cache()
    loss = model(torch.tensor([[5, 6, 7]]), memory, labels=torch.tensor([[5, 6, 7]])).loss
    assert loss.grad_fn is not None  # reading with gradients stays available for training


# ---- limits --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    """A model with 128 positions; its memory prefix takes 1 + N = 33 of them."""
    return random_model(max_position_embeddings=128, seed=9)


def test_max_new_tokens_is_capped_by_the_model_positions(small) -> None:
    memory = small.new_memory()
    with pytest.raises(ValueError, match=r"max_new_tokens=1000000000 .* at most 89 new tokens"):
        small.ask(memory, "Where?", max_new_tokens=1_000_000_000)
    with pytest.raises(ValueError, match="max_new_tokens=200"):
        small.stream(memory, "Where?", max_new_tokens=200)  # refused when called, not when first read
    with pytest.raises(ValueError, match="max_new_tokens=100"):
        small.generate(memory, torch.tensor([[5, 6, 7]]), max_new_tokens=100)
    assert len(small.generate(memory, torch.tensor([[5, 6, 7]]), max_new_tokens=92, min_new_tokens=92)[0]) == 95


def test_a_question_longer_than_the_window_is_refused(small) -> None:
    memory = small.new_memory()
    with pytest.raises(ValueError, match=r"question of 400 tokens .* 128 positions"):
        small.ask(memory, "x" * 400)
    with pytest.raises(ValueError, match=r"prompt of 100 tokens .* 128 positions"):
        small(torch.ones(1, 100, dtype=torch.long), memory)


def test_bad_token_ids_are_refused(small) -> None:
    memory = small.new_memory()
    vocab = small.lm.config.vocab_size
    for call in (lambda ids: small.inject(memory, ids), lambda ids: small(ids, memory),
                 lambda ids: small.generate(memory, ids, max_new_tokens=2)):
        with pytest.raises(ValueError, match="token ids must be integers, got torch.float32"):
            call(torch.tensor([[5.7] * 20]))
        with pytest.raises(ValueError, match=rf"invalid token ids \[{vocab}\]: outside the vocabulary of {vocab}"):
            call(torch.tensor([[5] * 19 + [vocab]]))
        with pytest.raises(ValueError, match=r"invalid token ids \[-1\]"):
            call(torch.tensor([[-1] + [5] * 19]))
    with pytest.raises(ValueError, match="token ids must be integers"):
        small.inject(memory, [1.5] * 20)
    assert memory.num_updates == 0


def test_chunk_size_must_fit_the_model(small) -> None:
    memory = small.new_memory()
    for bad in (0, -5):
        with pytest.raises(ValueError, match=f"chunk_size={bad}: must be at least 1"):
            small.inject(memory, list(range(5, 40)), chunk_size=bad)
    with pytest.raises(ValueError, match=r"chunk_size=5000 .* at most 119"):
        small.inject(memory, list(range(5, 40)), chunk_size=5000)
    assert memory.num_updates == 0
    assert small.inject(memory, list(range(5, 40)), chunk_size=119) == 1
