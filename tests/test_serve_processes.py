"""Server processes on one store: two at once lose no write; kill -9 at random points loses no
acknowledged write and leaves no corrupt version."""

from __future__ import annotations

import os
import random
import signal
import threading
from contextlib import ExitStack
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from conftest import replay_history  # noqa: E402
import memllm  # noqa: E402
from memllm.core.memory import Memory  # noqa: E402
from memllm.serve.store import Store  # noqa: E402
from memllm.bench.serve import ServerProcess  # noqa: E402


def server(store_dir, catalogue: str | None = None) -> ServerProcess:
    """`memllm.serve.run.serve` on the shipped tiny model in its own process (see memllm.bench.serve)."""
    return ServerProcess("tiny-memoryllm", str(store_dir), max_batch=64, threads=1, catalogue=catalogue)


def note(i: int) -> str:
    return f"Note {i}: the meeting room for team {i} is on floor {i % 7}, and Ga Rus booked it for {i % 5} hours."


def two_servers_lose_no_write(store_dir, catalogue: str | None = None) -> None:
    """24 injections into one memory from 8 clients through two server processes on one store: all
    applied, each in its own version, the final memory equal to replaying the history."""
    store = Store(str(store_dir), catalogue)
    key = store.create_key("acme")
    headers = {"authorization": f"Bearer {key}"}
    with ExitStack() as stack:
        servers = [stack.enter_context(server(store_dir, catalogue)) for _ in range(2)]
        mid = httpx.post(servers[0].url + "/v1/memories", json={}, headers=headers).json()["id"]
        n = 24

        def inject(i: int) -> int:
            url = servers[i % 2].url
            r = httpx.post(f"{url}/v1/memories/{mid}/inject", json={"text": note(i)}, headers=headers, timeout=300)
            r.raise_for_status()
            return r.json()["version"]

        with ThreadPoolExecutor(8) as pool:
            versions = list(pool.map(inject, range(n)))
    assert sorted(versions) == list(range(2, n + 2))  # every write got its own version, none lost
    history = store.history("acme", mid)
    assert sorted(h["text"] for h in history) == sorted(note(i) for i in range(n))
    replay = replay_history(memllm.load("tiny-memoryllm"), store, "acme", mid)
    final, _ = store.load("acme", mid)
    assert torch.equal(final.pool, replay.pool)


def test_two_server_processes_on_one_store_lose_no_write(tmp_path):
    two_servers_lose_no_write(tmp_path)


def kill_trials(tmp_path, trials: int) -> None:
    store_dir = str(tmp_path)
    store = Store(store_dir)
    key = store.create_key("acme")
    headers = {"authorization": f"Bearer {key}"}
    rng = random.Random(0)
    acknowledged: dict[str, set[str]] = {}
    memory_ids: list[str] = []
    for trial in range(trials):
        with server(store_dir) as running:  # killed below; leaving the block reaps it
            url = running.url
            if not memory_ids:
                memory_ids.append(httpx.post(url + "/v1/memories", json={}, headers=headers).json()["id"])
            mid = memory_ids[0]
            stop = threading.Event()

            def client(c: int) -> None:
                i = 0
                with httpx.Client(timeout=30) as http:
                    while not stop.is_set():
                        try:
                            r = http.post(f"{url}/v1/memories/{mid}/inject", json={"text": note(1000 * c + i)},
                                          headers=headers)
                        except httpx.HTTPError:
                            return
                        if r.status_code == 200:
                            acknowledged.setdefault(mid, set()).update(r.json()["updates"])
                        i += 1

            threads = [threading.Thread(target=client, args=(c,)) for c in range(3)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.3, 2.0))
            os.kill(running.proc.pid, signal.SIGKILL)
            running.proc.wait()
            stop.set()
            for t in threads:
                t.join()
        # the store opens, every acknowledged update is there, every available version loads
        reopened = Store(store_dir)
        recorded = {h["id"] for h in reopened.history("acme", mid)}
        assert acknowledged.get(mid, set()) <= recorded, f"trial {trial}: acknowledged updates missing"
        current, _ = reopened.load("acme", mid)
        assert current.num_updates == len(recorded)
        for v in reopened.versions("acme", mid):
            if v["available"]:
                assert isinstance(reopened.load("acme", mid, v["version"])[0], Memory)
    assert acknowledged.get(memory_ids[0]), "no injection was acknowledged in any trial"


def test_kill_9_during_injections_loses_no_acknowledged_update(tmp_path):
    kill_trials(tmp_path, trials=2)


@pytest.mark.slow
def test_kill_9_during_injections_100_trials(tmp_path):
    kill_trials(tmp_path, trials=100)
