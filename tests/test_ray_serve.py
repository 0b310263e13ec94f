"""`memllm serve --ray`: two Ray Serve replicas on one store, on a local Ray cluster of two CPUs.

Writes into one memory through both replicas are all applied (the store's compare-and-swap orders them);
asks go to the replica holding their memory (Ray Serve's multiplexing, keyed by the memory id the
router reads from the request)."""

from __future__ import annotations

import json
import socket
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
ray = pytest.importorskip("ray", reason="Ray Serve is optional: pip install -e '.[ray]'")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is optional: pip install -e '.[ray]'")

from conftest import replay_history  # noqa: E402
import memllm  # noqa: E402
from memllm.serve.app import Limits  # noqa: E402
from memllm.serve.ray_serve import APP_NAME, REPLICA_HEADER, Forwarded, application, memory_id_of  # noqa: E402
from memllm.serve.run import ServeConfig  # noqa: E402
from memllm.serve.store import Store  # noqa: E402

BIOS = ["Ga Rus. Hobby surfing. Native of Wygard. Favourite colour purple. Born 1949. A mechanic.",
        "Bo Dil. Born in 1966. Enjoys hiking. A photographer. Likes green best. From Yaria. Owns a goat.",
        "Da Vo. Works at Zorora. Likes red best. Native of Ulmora. Owns a goat. A baker.",
        "Ki Lam. Born 1971. Native of Essport. Likes blue best. Plays chess. A nurse."]
QUESTION = "Q: Where is Ga Rus from? A:"


def note(i: int) -> str:
    return f"Note {i}: the meeting room for team {i} is on floor {i % 7}, and Ga Rus booked it for {i % 5} hours."


def test_the_router_reads_the_memory_from_the_path_or_the_body():
    mid = "mem_0123456789abcdef"
    assert memory_id_of(f"/v1/memories/{mid}/inject", b"") == mid
    assert memory_id_of("/v1/chat/completions", json.dumps({"model": f"tiny-memoryllm/{mid}"}).encode()) == mid
    assert memory_id_of("/v1/completions", json.dumps({"model": "tiny-memoryllm", "memory": mid}).encode()) == mid
    for path, body in (("/v1/memories", b"{}"), ("/v1/chat/completions", b"not json"),
                       ("/v1/chat/completions", b'{"model": "tiny-memoryllm"}'), ("/v1/models", b""),
                       ("/v1/memories/../etc/x", b""), ("/v1/completions", b'{"model": 7}')):
        assert memory_id_of(path, body) == "", (path, body)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two replicas behind the router on a local Ray cluster; yields (url, store, auth headers)."""
    store_dir = str(tmp_path_factory.mktemp("store"))
    store = Store(store_dir)
    headers = {"authorization": f"Bearer {store.create_key('acme')}"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 << 20, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            config = ServeConfig(store_dir, threads=1, limits=Limits(max_in_flight=4096))
            serve.run(application(config, replicas=2), name=APP_NAME, route_prefix="/")
            yield f"http://127.0.0.1:{port}", store, headers
        finally:
            serve.shutdown()
            ray.shutdown()


@pytest.mark.slow
def test_injections_into_one_memory_through_both_replicas_are_all_applied(cluster):
    url, store, headers = cluster
    mid = httpx.post(url + "/v1/memories", json={}, headers=headers, timeout=60).json()["id"]
    # straight to the replicas with no multiplexed id, so that Ray spreads one memory's writes over both
    replicas = serve.get_deployment_handle("Replica", app_name=APP_NAME).options(stream=True)
    raw = [(k.encode(), v.encode()) for k, v in {**headers, "content-type": "application/json"}.items()]

    def inject(i: int) -> tuple[int, str, dict]:
        request = Forwarded("POST", f"/v1/memories/{mid}/inject", b"", raw, json.dumps({"text": note(i)}).encode())
        start, *rest = list(replicas.handle.remote(request))
        body = b"".join(m.get("body", b"") for m in rest)
        return start["status"], dict(start["headers"])[REPLICA_HEADER.encode()].decode(), json.loads(body)

    n = 24
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(inject, range(n)))
    assert [status for status, _, _ in results] == [200] * n, results
    assert len({replica for _, replica, _ in results}) == 2  # both replicas wrote into the memory
    assert sorted(body["version"] for _, _, body in results) == list(range(2, n + 2))  # none lost
    history = store.history("acme", mid)
    assert sorted(h["text"] for h in history) == sorted(note(i) for i in range(n))
    replay = replay_history(memllm.load("tiny-memoryllm"), store, "acme", mid)
    final, _ = store.load("acme", mid)
    assert final.num_updates == n and torch.equal(final.pool, replay.pool)


@pytest.mark.slow
def test_asks_go_to_the_replica_that_holds_their_memory(cluster):
    url, store, headers = cluster
    http = httpx.Client(base_url=url, headers=headers, timeout=120)
    mids, holder = [], {}
    for bio in BIOS:  # each injection, routed by its memory, loads that memory on one replica
        mid = http.post("/v1/memories", json={}).json()["id"]
        written = http.post(f"/v1/memories/{mid}/inject", json={"text": bio})
        written.raise_for_status()
        mids.append(mid)
        holder[mid] = written.headers[REPLICA_HEADER]
    time.sleep(1.0)  # routers learn which replica holds which memory from the replicas' reports (every 0.1 s)

    def ask(mid: str) -> httpx.Response:
        body = {"model": f"tiny-memoryllm/{mid}", "max_tokens": 4, "messages": [{"role": "user", "content": QUESTION}]}
        response = http.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        return response

    served: dict[str, set[str]] = defaultdict(set)
    answers: dict[str, set[str]] = defaultdict(set)
    for _ in range(4):
        for mid in mids:
            response = ask(mid)
            served[mid].add(response.headers[REPLICA_HEADER])
            answers[mid].add(response.json()["choices"][0]["message"]["content"])
    assert served == {mid: {holder[mid]} for mid in mids}  # each memory's asks went where it was loaded
    model = memllm.load("tiny-memoryllm")
    for mid in mids:
        assert answers[mid] == {model.ask(store.load("acme", mid)[0], QUESTION, max_new_tokens=4)}
    # a stream through the router arrives as server-sent events, with the same answer
    body = {"model": mids[0], "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": QUESTION}]}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
        assert response.headers[REPLICA_HEADER] in served[mids[0]]
    assert events[-1] == "[DONE]"
    streamed = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert streamed == answers[mids[0]].pop()
    # a memory that does not exist is the app's 404, through the router as without it
    missing = http.post("/v1/chat/completions", json={**body, "stream": False, "model": "mem_ffffffffffffffff"})
    assert missing.status_code == 404
    # an oversized body is refused by the router, announced or not (chunked: no Content-Length)
    big = b"{" + b" " * (5 << 20) + b"}"
    parts = (big[i:i + (1 << 16)] for i in range(0, len(big), 1 << 16))
    for content in (big, parts):
        refused = http.post(f"/v1/memories/{mids[0]}/inject", content=content, headers={"content-type": "application/json"})
        assert refused.status_code == 413, refused.text
    http.close()
