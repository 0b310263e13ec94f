"""memllm serve: the store, the model worker and the OpenAI-compatible app on the shipped tiny model."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from conftest import replay_history  # noqa: E402
import memllm  # noqa: E402
from memllm.core.generate import ask_many  # noqa: E402
from memllm.serve.app import Limits, RequestLimits, create_app  # noqa: E402
from memllm.serve.store import NotFound, Store, Update, VersionConflict  # noqa: E402
from memllm.serve.worker import Ask, Inject, Load, Stream, Worker  # noqa: E402

BIOS = [
    "Ga Rus. Hobby surfing. Native of Wygard. Favourite colour purple. Born 1949. A mechanic.",
    "Bo Dil. Born in 1966. Enjoys hiking. A photographer. Likes green best. From Yaria. Owns a goat.",
]


@pytest.fixture(scope="module")
def model():
    return memllm.load("tiny-memoryllm")


@pytest.fixture()
def store(tmp_path):
    return Store(str(tmp_path / "blobs"))


@pytest.fixture()
def served(model, store):
    app = create_app(model, store, model_name="tiny-memoryllm", limits=Limits(max_tokens=16, max_text_chars=2000))
    key = store.create_key("acme")
    with TestClient(app) as client:
        client.headers["authorization"] = f"Bearer {key}"
        yield client, store, key
    app.state.worker.close()


def test_versions_are_immutable_and_conflicts_lose_nothing(model, store):
    record = store.create("acme", model.new_memory(), name="notes")
    memory, v = store.load("acme", record.id)
    assert v == 1
    a, b = memory.fork(), memory.fork()
    model.inject(a, BIOS[0])
    model.inject(b, BIOS[1])
    v2, ids = store.commit("acme", record.id, 1, a, [Update(BIOS[0], 20)])
    assert v2 == 2 and len(ids) == 1
    with pytest.raises(VersionConflict):  # b was made from version 1 too: its write must not land
        store.commit("acme", record.id, 1, b, [Update(BIOS[1], 20)])
    latest, _ = store.load("acme", record.id)
    assert torch.equal(latest.pool, a.pool)
    first, _ = store.load("acme", record.id, 1)
    assert torch.equal(first.pool, memory.pool)  # version 1 is untouched
    assert [h["text"] for h in store.history("acme", record.id)] == [BIOS[0]]
    assert store.sweep() == 0  # every folder belongs to a committed version
    store._write_files(record.id, 3, b)  # a writer killed between its files and its catalogue row
    assert store.sweep() == 1
    assert store.load("acme", record.id)[1] == 2


def test_tenants_cannot_see_each_other(model, store):
    record = store.create("acme", model.new_memory())
    with pytest.raises(NotFound):
        store.get("globex", record.id)
    with pytest.raises(NotFound):
        store.load("globex", record.id)
    for bad in ("../../etc/passwd", "mem_/../x", "mem_0123", ""):
        with pytest.raises(NotFound):
            store.get("acme", bad)


def test_keys_are_stored_hashed_and_revocable(store):
    key = store.create_key("acme")
    assert store.authenticate(key).tenant == "acme"
    secret = key.split("-", 2)[2]
    raw = (store.root + "/catalogue.db")
    assert secret.encode() not in open(raw, "rb").read()
    assert store.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    store.revoke_key(key.split("-")[1])
    assert store.authenticate(key) is None


def test_ask_many_equals_asking_each_memory(model):
    memories = []
    for bio in BIOS:
        m = model.new_memory()
        model.inject(m, bio)
        memories.append(m)
    questions = ["Q: Where is Ga Rus from? A:", "Q: What colour does Bo Dil like? A:", "Q: Who is Bo Dil? A:"]
    rows = [memories[0], memories[1], memories[1]]
    together = ask_many(model, rows, questions, max_new_tokens=4)
    apart = [model.ask(m, q, max_new_tokens=4) for m, q in zip(rows, questions)]
    assert together == apart


def test_worker_batches_questions_for_different_memories(model, store):
    worker = Worker(model, store)
    ids = []
    for bio in BIOS:
        record = store.create("acme", model.new_memory())
        worker.submit(Inject("acme", record.id, [bio])).result(timeout=60)
        ids.append(record.id)
    # hold the worker inside a streamed answer, so that the questions below queue up together
    busy, release = threading.Event(), threading.Event()

    def hold(piece):
        busy.set()
        release.wait(timeout=60)

    held = worker.submit(Stream("acme", ids[0], "Q: Where is Ga Rus from? A:", 2, emit=hold))
    assert busy.wait(timeout=60)
    before = worker.forwards
    question = "Q: Where is Ga Rus from? A:"
    futures = [worker.submit(Ask("acme", ids[i % 2], question, max_new_tokens=4)) for i in range(8)]
    release.set()
    held.result(timeout=60)
    answers = [f.result(timeout=60) for f in futures]
    assert worker.forwards - before == 1  # 8 questions over 2 memories: one generation
    single = [model.ask(store.load("acme", i)[0], question, max_new_tokens=4) for i in ids]
    assert answers == [single[i % 2] for i in range(8)]
    worker.close()


def test_a_replica_loads_a_memory_ahead_of_its_requests(model, store):
    worker = Worker(model, store)
    record = store.create("acme", model.new_memory())
    assert worker.submit(Load(record.id)).result(timeout=60) == 1
    assert worker.cache.get(record.id, 1) is not None
    with pytest.raises(NotFound):
        worker.submit(Load("mem_ffffffffffffffff")).result(timeout=60)
    store.delete("acme", record.id)
    with pytest.raises(NotFound):
        worker.submit(Load(record.id)).result(timeout=60)
    worker.close()


def test_the_api_end_to_end(served):
    client, store, _ = served
    created = client.post("/v1/memories", json={"name": "people"})
    assert created.status_code == 201, created.text
    mid = created.json()["id"]
    done = client.post(f"/v1/memories/{mid}/inject", json={"texts": BIOS})
    assert done.status_code == 200, done.text
    assert done.json()["version"] == 2 and len(done.json()["updates"]) == 2
    models = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert f"tiny-memoryllm/{mid}" in models
    chat = client.post("/v1/chat/completions", json={"model": f"tiny-memoryllm/{mid}", "max_tokens": 3,
                                                     "messages": [{"role": "user", "content": "Q: Where is Ga Rus from? A:"}]})
    assert chat.status_code == 200, chat.text
    answer = chat.json()["choices"][0]["message"]["content"]
    memory, _ = store.load("acme", mid)
    model = client.app.state.worker.model
    assert answer == model.ask(memory, "Q: Where is Ga Rus from? A:", max_new_tokens=3)
    same = client.post("/v1/chat/completions", json={"model": "tiny-memoryllm", "memory": mid, "max_tokens": 3,
                                                     "messages": [{"role": "user", "content": "Q: Where is Ga Rus from? A:"}]})
    assert same.json()["choices"][0]["message"]["content"] == answer
    history = client.get(f"/v1/memories/{mid}/history").json()["data"]
    assert [h["text"] for h in history] == BIOS and all(h["tokens"] > 10 for h in history)
    fork = client.post(f"/v1/memories/{mid}/fork", json={}).json()
    client.post(f"/v1/memories/{fork['id']}/inject", json={"text": "Da Vo. Works at Zorora. Likes red best. From Ulm."})
    assert client.get(f"/v1/memories/{mid}").json()["version"] == 2  # the fork did not touch the original
    restored = client.post(f"/v1/memories/{mid}/versions/1/restore").json()
    assert restored["version"] == 3
    back, _ = store.load("acme", mid)
    first, _ = store.load("acme", mid, 1)
    assert torch.equal(back.pool, first.pool)
    exported = client.get(f"/v1/memories/{mid}/export", params={"version": 2})
    assert exported.status_code == 200
    imported = client.post("/v1/memories/import", files={"file": ("x.mem", exported.content)}).json()
    again, _ = store.load("acme", imported["id"])
    assert torch.equal(again.pool, store.load("acme", mid, 2)[0].pool)
    assert client.delete(f"/v1/memories/{fork['id']}").status_code == 200
    assert client.get(f"/v1/memories/{fork['id']}").status_code == 404


def test_streaming_matches_the_whole_answer(served):
    client, store, _ = served
    mid = client.post("/v1/memories", json={}).json()["id"]
    client.post(f"/v1/memories/{mid}/inject", json={"text": BIOS[0]})
    body = {"model": mid, "max_tokens": 6, "messages": [{"role": "user", "content": "Q: Where is Ga Rus from? A:"}]}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole


def chunked(body: bytes, size: int = 1 << 16):
    """A request body as a generator: httpx sends it chunked, without a Content-Length."""
    for i in range(0, len(body), size):
        yield body[i:i + size]


def test_a_chunked_body_within_the_limit_is_read(served):
    client, store, _ = served
    mid = client.post("/v1/memories", json={}).json()["id"]
    body = json.dumps({"text": "Ga Rus. Hobby surfing. Native of Wygard. Favourite colour purple. Born 1949."})
    r = client.post(f"/v1/memories/{mid}/inject", content=chunked(body.encode(), 7),
                    headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert store.get("acme", mid).version == 2


def test_bad_requests_get_clear_errors_and_change_nothing(served):
    client, store, key = served
    mid = client.post("/v1/memories", json={}).json()["id"]
    other = store.create_key("globex")
    cases = [
        (client.post(f"/v1/memories/{mid}/inject", json={"text": "   "}), 400),
        (client.post(f"/v1/memories/{mid}/inject", json={"text": "x" * 2001}), 413),
        (client.post(f"/v1/memories/{mid}/inject", json={}), 400),
        (client.post("/v1/chat/completions", json={"model": mid, "max_tokens": 999,
                                                   "messages": [{"role": "user", "content": "Q: hi A:"}]}), 400),
        (client.post("/v1/chat/completions", json={"model": "mem_ffffffffffffffff",
                                                   "messages": [{"role": "user", "content": "Q: hi A:"}]}), 404),
        (client.get("/v1/memories/../../etc/passwd"), 404),
        (client.get(f"/v1/memories/{mid}", headers={"authorization": f"Bearer {other}"}), 404),
        (client.get(f"/v1/memories/{mid}", headers={"authorization": "Bearer mk-key_00-nope"}), 401),
        (client.post("/v1/memories/import", files={"file": ("x.mem", b"not a memory")}), 400),
        (client.post("/v1/chat/completions", json={"model": mid, "max_tokens": 4, "messages": [
            {"role": "user", "content": "Q: " + "a " * 850 + "A:"}]}), 400),  # 850 tokens: past the positions
        (client.post(f"/v1/memories/{mid}/inject", content=b"{" + b" " * (5 << 20) + b"}",
                     headers={"content-type": "application/json"}), 413),
        (client.post(f"/v1/memories/{mid}/inject", content=chunked(b"{" + b" " * (5 << 20) + b"}"),
                     headers={"content-type": "application/json"}), 413),  # no Content-Length
    ]
    for response, status in cases:
        assert response.status_code == status, (response.status_code, response.text)
        assert response.json().get("detail") or response.json().get("error")
    assert store.get("acme", mid).version == 1
    assert store.history("acme", mid) == []


def test_a_request_past_the_in_flight_limit_is_refused_and_the_count_recovers():
    import httpx
    from starlette.responses import JSONResponse

    release = asyncio.Event()

    async def slow(scope, receive, send):
        await release.wait()
        await JSONResponse({"ok": True})(scope, receive, send)

    app = RequestLimits(slow, max_body=1000, max_in_flight=1)

    async def main() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            first = asyncio.create_task(client.get("/"))
            while app.in_flight == 0:
                await asyncio.sleep(0.01)
            second = await asyncio.wait_for(client.get("/"), 10)  # the first is still in flight
            release.set()
            return [(await first).status_code, second.status_code, (await client.get("/")).status_code,
                    (await client.post("/", content=b"x" * 1001)).status_code]

    assert asyncio.run(main()) == [200, 429, 200, 413]
    assert app.in_flight == 0


@pytest.mark.parametrize("n, clients", [(24, 8), (200, 16)])
def test_concurrent_injections_through_the_api_are_all_applied(served, n, clients):
    client, store, _ = served
    mid = client.post("/v1/memories", json={}).json()["id"]
    texts = [f"Note {i}: the meeting room for team {i} is on floor {i % 7}, booked by Ga Rus." for i in range(n)]
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda t: client.post(f"/v1/memories/{mid}/inject", json={"text": t}), texts))
    assert all(r.status_code == 200 for r in results)
    assert sorted(r.json()["version"] for r in results) == list(range(2, n + 2))
    history = store.history("acme", mid)
    assert sorted(h["text"] for h in history) == sorted(texts)
    # the final state equals applying them one by one in the recorded order, each update's drops drawn
    # from its id, to a fresh memory (version 1's files, like the next few, retention has removed by now)
    assert [v["available"] for v in store.versions("acme", mid)][:5] == [False] * 5
    replay = replay_history(client.app.state.worker.model, store, "acme", mid)
    final, _ = store.load("acme", mid)
    assert final.num_updates == replay.num_updates == n
    assert torch.equal(final.pool, replay.pool)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_openai_client_works_against_a_live_server(model, store):
    openai = pytest.importorskip("openai")
    uvicorn = pytest.importorskip("uvicorn")
    app = create_app(model, store, model_name="tiny-memoryllm")
    key = store.create_key("acme")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key)
        import httpx

        mid = httpx.post(f"http://127.0.0.1:{port}/v1/memories", json={},
                         headers={"authorization": f"Bearer {key}"}).json()["id"]
        httpx.post(f"http://127.0.0.1:{port}/v1/memories/{mid}/inject", json={"text": BIOS[0]},
                   headers={"authorization": f"Bearer {key}"}, timeout=60)
        assert f"tiny-memoryllm/{mid}" in [m.id for m in client.models.list()]
        reply = client.chat.completions.create(model=f"tiny-memoryllm/{mid}", max_tokens=3,
                                               messages=[{"role": "user", "content": "Q: Where is Ga Rus from? A:"}])
        text = reply.choices[0].message.content
        assert text == model.ask(store.load("acme", mid)[0], "Q: Where is Ga Rus from? A:", max_new_tokens=3)
        streamed = client.chat.completions.create(model=mid, max_tokens=3, stream=True,
                                                  messages=[{"role": "user", "content": "Q: Where is Ga Rus from? A:"}])
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == text
        done = client.completions.create(model=mid, prompt="Q: Where is Ga Rus from? A:", max_tokens=3)
        assert done.choices[0].text == text
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="mem_ffffffffffffffff", messages=[{"role": "user", "content": "hi"}])
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.worker.close()


def test_keys_from_the_command_line(tmp_path):
    from typer.testing import CliRunner

    from memllm.cli import app

    runner = CliRunner()
    made = runner.invoke(app, ["serve", "keys", "create", "--store", str(tmp_path), "--tenant", "acme"])
    assert made.exit_code == 0, made.output
    key = made.stdout.strip()
    store = Store(str(tmp_path))
    assert store.authenticate(key).tenant == "acme"
    listed = runner.invoke(app, ["serve", "keys", "list", "--store", str(tmp_path)])
    key_id = key.split("-")[1]
    assert key_id in listed.stdout and key.split("-", 2)[2] not in listed.stdout
    assert runner.invoke(app, ["serve", "keys", "revoke", key_id, "--store", str(tmp_path)]).exit_code == 0
    assert store.authenticate(key) is None
    both = runner.invoke(app, ["serve", "keys", "create", "--store", str(tmp_path), "--tenant", "a", "--admin"])
    assert both.exit_code == 2 and "--tenant" in both.output
    assert runner.invoke(app, ["serve"]).exit_code == 2  # no --store
    for bad, why in ((["--replicas", "2"], "--replicas needs --ray"), (["--cache-bytes", "0"], "at least 1"),
                     (["--ray", "--replicas", "0"], "at least 1")):
        refused = runner.invoke(app, ["serve", "--store", str(tmp_path), *bad])
        assert refused.exit_code == 2 and why in refused.output, (bad, refused.output)


def test_memory_cache_keeps_the_recently_used_within_its_bytes(model):
    from memllm.serve.worker import MemoryCache

    one = model.new_memory()
    size = one.pool.numel() * one.pool.element_size()
    cache = MemoryCache(max_bytes=2 * size)
    for name in ("a", "b"):
        cache.put(name, 1, model.new_memory())
    cache.put("a", 2, model.new_memory())  # a new version replaces the old entry, not added beside it
    assert cache.bytes == 2 * size and cache.get("a", 1) is None and cache.get("a", 2) is not None
    cache.get("b", 1)  # b is now the most recently used
    cache.put("c", 1, model.new_memory())  # over the bound: a, the least recently used, goes
    assert list(cache.entries) == ["b", "c"] and cache.bytes == 2 * size
    cache.drop("b")
    assert cache.bytes == size
    small = MemoryCache(max_bytes=size // 2)  # a memory larger than the bound still stays loaded
    small.put("x", 1, model.new_memory())
    assert small.get("x", 1) is not None


def test_a_hot_memory_is_described_from_the_cache_and_a_text_is_tokenized_once(served, monkeypatch):
    client, store, _ = served
    model = client.app.state.worker.model
    calls = []
    tokenize = model.encode_context
    monkeypatch.setattr(model, "encode_context", lambda context: calls.append(type(context)) or tokenize(context))
    mid = client.post("/v1/memories", json={"name": "hot"}).json()["id"]
    r = client.post(f"/v1/memories/{mid}/inject", json={"texts": BIOS})
    assert r.status_code == 200, r.text
    assert calls.count(str) == len(BIOS)  # each text tokenized once (the injection takes the ids)

    def no_load(*args, **kwargs):
        raise AssertionError("the memory was read from the store")

    monkeypatch.setattr(store, "load", no_load)
    info = client.get(f"/v1/memories/{mid}").json()
    assert info["version"] == 2 and info["info"]["updates"] == len(BIOS)
