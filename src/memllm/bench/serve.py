"""`memllm bench serve`: the server's throughput and latency, batched against one question at a time.

The server runs in a process of its own on loopback (`memllm.serve.run.serve`); clients are threads of
this process issuing HTTP requests (each waits for its answer before sending the next). For every (clients, memories) cell it measures
asks (chat completions, questions about people written into the memories) and injections, first with
the worker answering queued questions together (`batched`), then one at a time (`max_batch=1`), in the
same run. The last line is JSON; `batched_speedup_16_clients_8_memories` is the asks/s ratio the
server issue targets (>= 3).
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx

from memllm.bench.timing import load_average
from memllm.core.checkpoint import load
from memllm.serve.store import Store

QUESTION = "Q: Where is {name} from? A:"
PEOPLE = [("Ga Rus", "Ga Rus. Hobby surfing. Native of Wygard. Favourite colour purple. Born 1949."),
          ("Bo Dil", "Bo Dil. Born in 1966. Enjoys hiking. A photographer. Likes green best. From Yaria."),
          ("Da Vo", "Da Vo. Works at Zorora. Likes red best. Native of Ulmora. Owns a goat. A baker.")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`memllm.serve.run.serve` in a process of its own (the clients' threads must not share its GIL);
    `proc` is the process, `url` where it listens once the `with` block is entered. `catalogue`: an
    SQLAlchemy URL (default: SQLite in the store directory)."""

    def __init__(self, model_path: str, store_dir: str, max_batch: int, threads: int | None,
                 catalogue: str | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.code = ("from memllm.serve.run import ServeConfig, serve; from memllm.serve.app import Limits; "
                     f"serve(ServeConfig({store_dir!r}, {model_path!r}, {catalogue!r}, threads={threads!r}, "
                     f"max_batch={max_batch}, limits=Limits(max_in_flight=4096)), port={self.port})")

    def __enter__(self) -> "ServerProcess":
        self.proc = subprocess.Popen([sys.executable, "-c", self.code], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the benchmark server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                httpx.get(self.url + "/v1/models", timeout=1)
                return self
            except httpx.HTTPError:
                time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError("the benchmark server did not start in 180 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _cell(n_clients: int, requests_per_client: int, send: Callable[[httpx.Client, int, int], None],
          warm: Callable[[httpx.Client, int, int], None]) -> dict:
    """Run n_clients threads, each sending requests_per_client requests in turn; throughput and latency.

    The clock starts once every client has sent one untimed question (`ask`): a client's first
    request would otherwise carry its TLS context and its connection, tens of milliseconds of the
    clients' CPU, and the server's first reading of each memory (loading it, its prefix): a cold
    start, not the throughput of hot memories that the cells measure. An ask changes no memory, so
    the same warm-up serves the injection cells."""
    latencies: list[float] = []
    lock = threading.Lock()
    started: list[float] = []
    ready = threading.Barrier(n_clients, action=lambda: started.append(time.perf_counter()))

    def client(c: int) -> None:
        with httpx.Client(timeout=600) as http:
            warm(http, c, 0)
            ready.wait()
            for r in range(requests_per_client):
                t = time.perf_counter()
                send(http, c, r)
                with lock:
                    latencies.append(time.perf_counter() - t)

    with ThreadPoolExecutor(n_clients) as pool:
        list(pool.map(client, range(n_clients)))
    wall = time.perf_counter() - started[0]
    latencies.sort()
    return {"requests": len(latencies), "per_s": round(len(latencies) / wall, 2),
            "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p95_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 1)}


def run_bench_serve(model_path: str = "tiny-memoryllm", clients: tuple[int, ...] = (1, 4, 16, 64),
                    memories: tuple[int, ...] = (1, 8, 64), requests_per_client: int = 4, max_new_tokens: int = 4,
                    threads: int | None = None, report: Callable[[str], None] = print) -> dict:
    """Every (clients, memories) cell, batched and one at a time: a line per cell to `report`; returns the
    results (the command prints them as its last line)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    model = load(model_path)
    results: dict = {"model": model_path, "load_average": load_average(), "threads": torch.get_num_threads(),
                     "max_new_tokens": max_new_tokens, "requests_per_client": requests_per_client, "cells": []}
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        key = store.create_key("bench")
        headers = {"authorization": f"Bearer {key}"}
        for n_mem in memories:
            ids = []
            for i in range(n_mem):
                record = store.create("bench", model.new_memory())
                memory, _ = store.load("bench", record.id)
                model.inject(memory, PEOPLE[i % len(PEOPLE)][1])
                store.commit("bench", record.id, 1, memory, [])
                ids.append(record.id)
            for n_clients in clients:
                cell = {"clients": n_clients, "memories": n_mem}
                for mode, max_batch in (("batched", 64), ("one_at_a_time", 1)):
                    with ServerProcess(model_path, tmp, max_batch, threads) as server:
                        def ask(http: httpx.Client, c: int, r: int) -> None:
                            name = PEOPLE[(c + r) % len(PEOPLE)][0]
                            body = {"model": ids[(c + r) % n_mem], "max_tokens": max_new_tokens,
                                    "messages": [{"role": "user", "content": QUESTION.format(name=name)}]}
                            http.post(server.url + "/v1/chat/completions", json=body, headers=headers).raise_for_status()

                        def inject(http: httpx.Client, c: int, r: int) -> None:
                            text = f"Client {c} note {r}: the meeting is on floor {r % 9}, booked by {PEOPLE[c % 3][0]}."
                            http.post(f"{server.url}/v1/memories/{ids[(c + r) % n_mem]}/inject", json={"text": text},
                                      headers=headers).raise_for_status()

                        cell[f"ask_{mode}"] = _cell(n_clients, requests_per_client, ask, warm=ask)
                        cell[f"inject_{mode}"] = _cell(n_clients, max(1, requests_per_client // 2), inject, warm=ask)
                cell["ask_speedup"] = round(cell["ask_batched"]["per_s"] / cell["ask_one_at_a_time"]["per_s"], 2)
                report(f"{n_clients:3d} clients, {n_mem:3d} memories: asks/s {cell['ask_batched']['per_s']:8.1f} batched, "
                       f"{cell['ask_one_at_a_time']['per_s']:8.1f} one at a time ({cell['ask_speedup']:.2f}x); "
                       f"p95 {cell['ask_batched']['p95_ms']:.0f} / {cell['ask_one_at_a_time']['p95_ms']:.0f} ms; "
                       f"injections/s {cell['inject_batched']['per_s']:.1f}")
                results["cells"].append(cell)
    target = [c for c in results["cells"] if c["clients"] == 16 and c["memories"] == 8]
    results["batched_speedup_16_clients_8_memories"] = target[0]["ask_speedup"] if target else None
    return results
