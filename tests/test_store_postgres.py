"""The store's catalogue on a real PostgreSQL (16, from pgserver's wheel, started for this module): the
version compare-and-swap under racing writers on two engines, tenants made concurrently, and two server
processes on one store."""

from __future__ import annotations

import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("sqlalchemy")
pgserver = pytest.importorskip("pgserver", reason="a local PostgreSQL comes from pgserver (the test extra)")
pytest.importorskip("psycopg", reason="SQLAlchemy's PostgreSQL driver: pip install 'psycopg[binary]' (the postgres extra)")

import sqlalchemy as sa  # noqa: E402

import memllm  # noqa: E402
from memllm.serve.store import Store, Update, VersionConflict  # noqa: E402
from test_serve_processes import two_servers_lose_no_write  # noqa: E402


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """The URL of a PostgreSQL server running for this module's tests."""
    server = pgserver.get_server(tmp_path_factory.mktemp("postgres"), cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()


@pytest.fixture()
def catalogue(postgres) -> str:
    """A fresh database of its own for each test."""
    name = "t_" + secrets.token_hex(6)
    admin = sa.create_engine(postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as db:
        db.execute(sa.text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return sa.make_url(postgres).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def model():
    return memllm.load("tiny-memoryllm")


def test_the_catalogue_is_postgresql_and_a_stale_write_is_refused(model, catalogue, tmp_path):
    store = Store(str(tmp_path), catalogue)
    assert store.engine.dialect.name == "postgresql"
    record = store.create("acme", model.new_memory())
    memory, _ = store.load("acme", record.id)
    a, b = memory.fork(), memory.fork()
    model.inject(a, "Ga Rus. Hobby surfing. Native of Wygard. Favourite colour purple. Born 1949. A mechanic.")
    model.inject(b, "Bo Dil. Born in 1966. Enjoys hiking. A photographer. Likes green best. From Yaria.")
    assert store.commit("acme", record.id, 1, a, [Update("a", 5)])[0] == 2
    with pytest.raises(VersionConflict):  # b was made from version 1 too
        store.commit("acme", record.id, 1, b, [Update("b", 5)])
    assert torch.equal(store.load("acme", record.id)[0].pool, a.pool)
    assert [h["text"] for h in store.history("acme", record.id)] == ["a"]


def test_racing_writers_on_two_engines_lose_nothing(model, catalogue, tmp_path):
    """8 threads over two Store objects (two connection pools, as two processes have) each commit 4
    updates, retrying on conflict as the worker does: every update lands in its own version."""
    stores = [Store(str(tmp_path), catalogue), Store(str(tmp_path), catalogue)]
    mid = stores[0].create("acme", model.new_memory()).id
    conflicts, lock, start = [0], threading.Lock(), threading.Barrier(8)

    def writer(w: int) -> None:
        store = stores[w % 2]
        start.wait()
        for i in range(4):
            while True:
                memory, version = store.load("acme", mid)
                try:
                    store.commit("acme", mid, version, memory, [Update(f"writer {w} update {i}", 5)])
                    break
                except VersionConflict:
                    with lock:
                        conflicts[0] += 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(writer, range(8)))
    assert conflicts[0] > 0  # the writers did race
    versions = stores[1].versions("acme", mid)
    assert [v["version"] for v in versions] == list(range(1, 34))
    assert [v["parent"] for v in versions] == [None] + list(range(1, 33))
    history = stores[1].history("acme", mid)
    assert sorted(h["version"] for h in history) == list(range(2, 34))  # one update per version
    assert sorted(h["text"] for h in history) == sorted(f"writer {w} update {i}" for w in range(8) for i in range(4))


def test_two_writers_making_one_tenant_both_succeed(catalogue, tmp_path):
    """Both look for the tenant before either adds it (held there by an SQLAlchemy event): the second
    insert then violates the key, which must not fail the key it was making."""
    store = Store(str(tmp_path), catalogue)
    looked, lock, both_looked = [0], threading.Lock(), threading.Barrier(2, timeout=30)

    @sa.event.listens_for(store.engine, "after_cursor_execute")
    def hold_after_looking(conn, cursor, statement, *args) -> None:
        if statement.lstrip().startswith("SELECT tenants.id"):
            with lock:
                looked[0] += 1
                first_two = looked[0] <= 2
            if first_two:
                both_looked.wait()

    with ThreadPoolExecutor(2) as pool:
        keys = list(pool.map(lambda _: store.create_key("globex"), range(2)))
    assert looked[0] == 2
    assert all(store.authenticate(k).tenant == "globex" for k in keys)


@pytest.mark.slow  # 45 s here; the same test on SQLite runs by default (tests/test_serve_processes.py)
def test_two_server_processes_on_postgresql_lose_no_write(catalogue, tmp_path):
    two_servers_lose_no_write(tmp_path, catalogue)
