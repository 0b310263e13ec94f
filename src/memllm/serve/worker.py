"""The one thread that owns the model: requests queue to it and it serves them in arrival order.

Questions that arrive together are answered together: the worker drains what is queued (up to
`max_batch` jobs) and answers each run of consecutive questions in one batched generation per memory
(MemoryLLM: one generation for all of them, rows reading different memories, see
`memllm.core.generate.ask_many`). Injections are applied where they arrived, so a question queued
after an injection into its memory sees it; each is acknowledged only after its version is durable
in the store. Hot memories stay loaded, bounded by bytes (least recently used out first); the store's
version is checked before every use, so a memory another server process advanced is reloaded, and a
write that lost the race to another process is replayed on the new version (compare-and-swap).
"""

from __future__ import annotations

import queue
import random
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from memllm.core.generate import ask_many
from memllm.core.inject import RandomDrop
from memllm.core.memory import Memory
from memllm.core.model import MemoryModel
from memllm.serve.store import Store, Update, VersionConflict, update_seed

WRITE_PATIENCE_S = 120.0  # how long an injection keeps retrying a compare-and-swap it keeps losing


@dataclass
class Ask:
    tenant: str
    memory_id: str
    prompt: str
    max_new_tokens: int
    chat: bool | None = None
    future: Future = field(default_factory=Future)


@dataclass
class Stream:
    """A question answered piece by piece: `emit(piece)` per piece, then `emit(None)`."""

    tenant: str
    memory_id: str
    prompt: str
    max_new_tokens: int
    emit: Callable[[str | None], None]
    chat: bool | None = None
    future: Future = field(default_factory=Future)


@dataclass
class Inject:
    tenant: str
    memory_id: str
    texts: list[str]
    key: str | None = None
    future: Future = field(default_factory=Future)  # -> (version, update ids)


@dataclass
class Load:
    """Load a memory into the cache ahead of its requests (a Ray Serve replica taking a memory on)."""

    memory_id: str
    future: Future = field(default_factory=Future)  # -> the version loaded


def seeded_drop(model: MemoryModel, update_id: str) -> RandomDrop:
    """The published random drop, drawn from the update's id: replaying the history reproduces the memory."""
    generator = torch.Generator().manual_seed(update_seed(update_id))
    return RandomDrop(per_layer=model.config.drop_memory_per_layer, generator=generator)


class MemoryCache:
    """Loaded memories by id, with the version they hold; least recently used out past `max_bytes`.
    The worker fills it; request threads read it (a memory's info) and drop from it (delete), so every
    method holds a lock."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, tuple[int, Memory, int]] = OrderedDict()  # id -> (version, memory, bytes)
        self.bytes = 0
        self._lock = threading.Lock()

    def get(self, memory_id: str, version: int) -> Memory | None:
        with self._lock:
            entry = self.entries.get(memory_id)
            if entry is None or entry[0] != version:
                return None
            self.entries.move_to_end(memory_id)
            return entry[1]

    def put(self, memory_id: str, version: int, memory: Memory) -> None:
        size = _nbytes(memory)
        with self._lock:
            self._drop(memory_id)
            self.entries[memory_id] = (version, memory, size)
            self.bytes += size
            while len(self.entries) > 1 and self.bytes > self.max_bytes:
                self.bytes -= self.entries.popitem(last=False)[1][2]

    def drop(self, memory_id: str) -> None:
        with self._lock:
            self._drop(memory_id)

    def _drop(self, memory_id: str) -> None:
        entry = self.entries.pop(memory_id, None)
        if entry is not None:
            self.bytes -= entry[2]


def _nbytes(memory: Memory) -> int:
    n = memory.pool.numel() * memory.pool.element_size()
    if memory.ltm is not None:
        n += sum(t.numel() * t.element_size() for t in memory.ltm.state_dict().values())
    return n


class Worker:
    """Serves Ask, Stream, Inject and Load jobs on one thread; `submit` returns the job's future."""

    def __init__(self, model: MemoryModel, store: Store, max_batch: int = 64, cache_bytes: int = 1 << 30,
                 batch_across_memories: bool = True) -> None:
        self.model, self.store, self.max_batch = model, store, max_batch
        self.batch_across_memories = batch_across_memories
        self.cache = MemoryCache(cache_bytes)
        self.jobs: queue.Queue = queue.Queue()
        self.forwards = 0  # batched generations run (for tests and the benchmark)
        self._thread = threading.Thread(target=self._run, name="memllm-model-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Ask | Stream | Inject | Load) -> Future:
        self.jobs.put(job)
        return job.future

    def close(self) -> None:
        self.jobs.put(None)
        self._thread.join(timeout=30)

    # ---- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self.jobs.put(None)
                    break
                batch.append(job)
            self._serve(batch)

    def _serve(self, batch: list) -> None:
        """Arrival order, with each run of consecutive plain questions answered together."""
        asks: list[Ask] = []
        for job in batch:
            if isinstance(job, Ask):
                asks.append(job)
                continue
            self._answer(asks)
            asks = []
            self._guard(job, {Stream: self._stream, Inject: self._inject, Load: self._load}[type(job)])
        self._answer(asks)

    @staticmethod
    def _guard(job, fn) -> None:
        try:
            result = fn(job)
        except BaseException as e:  # the client gets the error; the worker goes on
            if isinstance(job, Stream):
                job.emit(None)
            job.future.set_exception(e)
        else:
            job.future.set_result(result)

    # ---- jobs ----------------------------------------------------------------------------------

    def current(self, tenant: str, memory_id: str) -> tuple[Memory, int]:
        """The memory at its current version in the store (loaded once, then cached)."""
        version = self.store.get(tenant, memory_id).version
        memory = self.cache.get(memory_id, version)
        if memory is None:
            memory, version = self.store.load(tenant, memory_id, version, device=str(self.model.device))
            self.model.check_memory(memory)
            self.cache.put(memory_id, version, memory)
        return memory, version

    def _answer(self, asks: list[Ask]) -> None:
        if not asks:
            return
        ready: list[tuple[Ask, Memory]] = []
        loaded: dict[tuple[str, str], Memory] = {}  # one version check per memory per batch
        for job in asks:
            try:
                where = (job.tenant, job.memory_id)
                if where not in loaded:
                    loaded[where] = self.current(*where)[0]
                ready.append((job, loaded[where]))
            except BaseException as e:
                job.future.set_exception(e)
        # one generation per (max_new_tokens, chat) group: across memories when the model allows
        groups: dict[tuple, list[tuple[Ask, Memory]]] = {}
        for job, memory in ready:
            across = self.batch_across_memories and self.model.config.kind == "memoryllm"
            key = (job.max_new_tokens, job.chat, None if across else job.memory_id)
            groups.setdefault(key, []).append((job, memory))
        for (max_new_tokens, chat, _), members in groups.items():
            try:
                answers = ask_many(self.model, [m for _, m in members], [j.prompt for j, _ in members],
                                   max_new_tokens=max_new_tokens, chat=chat)
                self.forwards += 1
            except BaseException as e:
                for job, _ in members:
                    job.future.set_exception(e)
                continue
            for (job, _), answer in zip(members, answers):
                job.future.set_result(answer)

    def _load(self, job: Load) -> int:
        return self.current(self.store.owner(job.memory_id), job.memory_id)[1]

    def _stream(self, job: Stream) -> None:
        memory, _ = self.current(job.tenant, job.memory_id)
        try:
            for piece in self.model.stream(memory, job.prompt, max_new_tokens=job.max_new_tokens, chat=job.chat):
                job.emit(piece)
        finally:
            job.emit(None)

    def _inject(self, job: Inject) -> tuple[int, list[str]]:
        """Write the texts (one update each) into a fork of the current memory and commit it as the next
        version; on a conflict (another process wrote first) start again from the new version, after a
        short random pause so that two writers do not keep colliding."""
        deadline = time.monotonic() + WRITE_PATIENCE_S
        while True:
            memory, version = self.current(job.tenant, job.memory_id)
            updated = memory.fork()
            written = []
            for text in job.texts:
                with warnings.catch_warnings():  # a short text's warning comes once, from the injection below
                    warnings.simplefilter("ignore")
                    ids = self.model.encode_context(text)  # tokenized once: counted, then injected
                update = Update(text=text, tokens=int(ids.numel()), key=job.key)
                self.model.inject(updated, ids, drop=seeded_drop(self.model, update.id))
                written.append(update)
            try:
                new, ids = self.store.commit(job.tenant, job.memory_id, version, updated, written)
            except VersionConflict:
                self.cache.drop(job.memory_id)
                if time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.0, 0.05))
                continue
            self.cache.put(job.memory_id, new, updated)
            return new, ids
