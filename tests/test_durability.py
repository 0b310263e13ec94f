"""Memory files that survive concurrency, kills and bad input (issue 10, items 1, 2, 5 and 6)."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import signal
import stat
import struct
import threading
import time
from pathlib import Path

import pytest
import torch

from memllm.core.ltm import LongTermMemory, LTMConfig, LTMLayer
from memllm.core.memory import FORMAT_VERSION, Memory, MemoryFileError, MemoryLockedError, lock

SHARD_BYTES = 64 << 10  # small, so a memory of a few hundred KB is sharded
SAVER_ROWS = 1500  # the concurrent saver's long-term memory: about 160 KB a layer


def plain_memory(seed: int = 0) -> Memory:
    g = torch.Generator().manual_seed(seed)
    return Memory(pool=torch.randn(2, 8, 16, generator=g), fingerprint="test-model")


def mplus_memory(rows: int = 600, seed: int = 0) -> Memory:
    """An M+ memory whose long-term memory (about 60 KB a layer at 600 rows) shards at SHARD_BYTES."""
    g = torch.Generator().manual_seed(seed)
    layers = [
        LTMLayer(torch.randn(rows, 16, generator=g), torch.randn(rows, 8, generator=g),
                 torch.arange(rows, dtype=torch.long), torch.ones(rows))
        for _ in range(3)
    ]
    return Memory(pool=torch.randn(3, 8, 16, generator=g), fingerprint="test-model",
                  stm_ages=torch.zeros(3, 8, dtype=torch.long),
                  ltm=LongTermMemory(LTMConfig(num_tokens=4, num_ltm_blocks=2), layers))


def listed_shards(path: Path) -> list[str]:
    return [s["file"] for s in json.loads(read_header(path).get("shards", "[]"))]


def read_header(path: Path) -> dict[str, str]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])["__metadata__"]


def rewrite_header(path: Path, **fields: str | None) -> None:
    """Edit metadata fields in place, as a user with a hex editor would (None deletes a field)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    for key, value in fields.items():
        if value is None:
            header["__metadata__"].pop(key, None)
        else:
            header["__metadata__"][key] = value
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the tensor data stays 8-byte aligned
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])


def same(a: Memory, b: Memory) -> bool:
    ta, tb = a.tensors(), b.tensors()
    return a.num_updates == b.num_updates and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# ---- item 1: locking -------------------------------------------------------------------------


def test_lock_is_reentrant_and_save_under_it_does_not_deadlock(tmp_path: Path) -> None:
    path = tmp_path / "a.mem"
    with lock(path), lock(path, timeout=1):
        plain_memory().save(path)
    assert Memory.load(path).num_updates == 0


def _hold_lock(path: str, locked) -> None:
    with lock(path):
        locked.set()
        time.sleep(600)


def test_lock_excludes_other_processes_and_is_released_when_its_holder_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "a.mem"
    context = multiprocessing.get_context("fork")  # no re-import of torch: fast
    locked = context.Event()
    holder = context.Process(target=_hold_lock, args=(str(path), locked))
    holder.start()
    try:
        assert locked.wait(60)
        with pytest.raises(MemoryLockedError, match=r"a\.mem is locked"):
            with lock(path, timeout=0.2):
                pass
        (tmp_path / "link.mem").symlink_to(path)
        with pytest.raises(MemoryLockedError):
            with lock(tmp_path / "link.mem", timeout=0.2):  # a symlink to the memory shares its lock
                pass
    finally:
        holder.kill()  # SIGKILL: no release by the holder
        holder.join()
    with lock(path, timeout=5):  # the kernel dropped the dead holder's lock
        pass


def test_lock_in_a_missing_directory_is_refused_without_creating_it(tmp_path: Path) -> None:
    with pytest.raises(MemoryFileError, match="does not exist"):
        with lock(tmp_path / "typo" / "a.mem"):
            pass
    assert not (tmp_path / "typo").exists()


def _locked_update(path: str, go: str) -> None:
    """One writer: load, change the pool and count, save, all under the memory's lock."""
    while not os.path.exists(go):
        time.sleep(0.005)
    with lock(path):
        memory = Memory.load(path)
        time.sleep(0.05)  # widen the window a lost update needs
        memory.pool = memory.pool + 1
        memory.num_updates += 1
        memory.save(path, shard_bytes=SHARD_BYTES)
    os._exit(0)


def test_four_concurrent_writers_all_apply(tmp_path: Path) -> None:
    path, go = tmp_path / "m.mem", tmp_path / "go"
    start = mplus_memory()
    start.save(path, shard_bytes=SHARD_BYTES)
    context = multiprocessing.get_context("fork")  # no re-import of torch: fast
    writers = [context.Process(target=_locked_update, args=(str(path), str(go))) for _ in range(4)]
    for w in writers:
        w.start()
    go.touch()
    for w in writers:
        w.join(60)
    assert [w.exitcode for w in writers] == [0] * 4
    final = Memory.load(path)
    assert final.num_updates == 4 and torch.equal(final.pool, start.pool + 1 + 1 + 1 + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["go", "m.mem", "m.mem.lock", *listed_shards(path)])


def test_threads_sharing_one_memory_file_lose_no_update(tmp_path: Path) -> None:
    path = tmp_path / "m.mem"
    start = plain_memory()
    start.save(path)

    def update() -> None:
        with lock(path):
            memory = Memory.load(path)
            time.sleep(0.02)
            memory.pool = memory.pool + 1
            memory.num_updates += 1
            memory.save(path)

    threads = [threading.Thread(target=update) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    final = Memory.load(path)
    assert final.num_updates == 4 and torch.equal(final.pool, start.pool + 1 + 1 + 1 + 1)


def test_loading_while_another_process_saves_always_gives_a_whole_version(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    saver = context.Process(target=_save_forever, args=(str(tmp_path), ready))
    saver.start()
    try:
        assert ready.wait(60)
        base = mplus_memory(rows=SAVER_ROWS).pool
        versions: set[int] = set()
        deadline = time.monotonic() + 120
        loads = 0  # at least 30 loads, and on until the saves have overlapped them (a loaded machine is slow)
        while loads < 30 or (len(versions) < 3 and time.monotonic() < deadline):
            memory = Memory.load(tmp_path / "mplus.mem")
            assert torch.equal(memory.pool, base + memory.num_updates)
            versions.add(memory.num_updates)
            loads += 1
    finally:
        saver.kill()
        saver.join()
    assert len(versions) > 1  # the saves did overlap the loads


# ---- item 2: shards belong to exactly one memory ---------------------------------------------------


def test_saving_a_memory_never_touches_other_memories_shards(tmp_path: Path) -> None:
    others = {name: mplus_memory(seed=i) for i, name in enumerate(["notes.mem.bak", "a.mem", "d.mem", "notes.mem.x"])}
    for name, memory in others.items():
        memory.save(tmp_path / name, shard_bytes=SHARD_BYTES)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for name in ["notes.mem", "[draft].mem", "*.mem", "notes.mem", "[draft].mem", "*.mem"]:  # twice: replaces shards
        mplus_memory(seed=9).save(tmp_path / name, shard_bytes=SHARD_BYTES)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before} == before
    for name, memory in others.items():
        assert same(Memory.load(tmp_path / name), memory)
    expected = set(before) | {f"{n}{suffix}" for n in ["notes.mem", "[draft].mem", "*.mem"] for suffix in ["", ".lock"]}
    expected |= {s for n in ["notes.mem", "[draft].mem", "*.mem"] for s in listed_shards(tmp_path / n)}
    assert {p.name for p in tmp_path.iterdir()} == expected  # the first generation's shards are gone


def test_a_copied_or_renamed_main_file_keeps_the_shards_it_lists(tmp_path: Path) -> None:
    path = tmp_path / "notes.mem"
    original = mplus_memory()
    original.save(path, shard_bytes=SHARD_BYTES)
    (tmp_path / "copy.mem").write_bytes(path.read_bytes())  # cp of the main file only
    for _ in range(2):
        mplus_memory(seed=1).save(path, shard_bytes=SHARD_BYTES)
    assert same(Memory.load(tmp_path / "copy.mem"), original)
    path.rename(tmp_path / "archive.mem")  # mv of the main file only, then a new memory of the old name
    for _ in range(2):
        mplus_memory(seed=2).save(path, shard_bytes=SHARD_BYTES)
    assert same(Memory.load(tmp_path / "archive.mem"), mplus_memory(seed=1))
    assert same(Memory.load(tmp_path / "copy.mem"), original)


def test_unsharded_save_removes_the_shards_the_previous_version_listed(tmp_path: Path) -> None:
    path = tmp_path / "m.mem"
    mplus_memory().save(path, shard_bytes=SHARD_BYTES)
    assert len(listed_shards(path)) == 3
    mplus_memory().save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mem", "m.mem.lock"]


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/x.safetensors", ".."])
def test_shard_outside_the_memory_directory_is_refused(tmp_path: Path, shard: str) -> None:
    memory_dir = tmp_path / "memories"
    memory_dir.mkdir()
    path = memory_dir / "m.mem"
    mplus_memory().save(path, shard_bytes=SHARD_BYTES)
    shards = json.loads(read_header(path)["shards"])
    (memory_dir / shards[0]["file"]).rename(tmp_path / "outside.safetensors")
    shards[0]["file"] = shard
    rewrite_header(path, shards=json.dumps(shards))
    for verify in (True, False):
        with pytest.raises(MemoryFileError, match="'shards'.*not a file name in the memory's own directory"):
            Memory.load(path, verify=verify)


# ---- item 5: saving writes the file, not the path ---------------------------------------------------


def test_save_writes_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    target, link = tmp_path / "store" / "real.mem", tmp_path / "link.mem"
    mplus_memory().save(target, shard_bytes=SHARD_BYTES)
    link.symlink_to(target)
    changed = mplus_memory(seed=1)
    changed.num_updates = 5
    changed.save(link, shard_bytes=SHARD_BYTES)
    assert link.is_symlink() and link.resolve() == target
    assert same(Memory.load(target), changed) and same(Memory.load(link), changed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.mem", "store"]  # shards and lock beside the target
    stored = sorted(p.name for p in (tmp_path / "store").iterdir())
    assert stored == sorted(["real.mem", "real.mem.lock", *listed_shards(target)])


def test_save_keeps_the_mode_and_a_new_file_gets_the_umask_default(tmp_path: Path) -> None:
    path = tmp_path / "a.mem"
    plain_memory().save(path)
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    path.chmod(0o644)
    plain_memory(seed=1).save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    path.chmod(0o640)
    sharded = tmp_path / "m.mem"
    mplus_memory().save(sharded, shard_bytes=SHARD_BYTES)
    sharded.chmod(0o640)
    mplus_memory(seed=1).save(sharded, shard_bytes=SHARD_BYTES)
    assert {stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ["m.mem", *listed_shards(sharded)]} == {0o640}


def test_read_only_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "a.mem"
    plain_memory().save(path)
    path.chmod(0o444)
    before = path.read_bytes()
    with pytest.raises(MemoryFileError, match=r"a\.mem.*read-only \(mode 0444\)"):
        plain_memory(seed=1).save(path)
    assert path.read_bytes() == before and stat.S_IMODE(path.stat().st_mode) == 0o444


def test_directory_or_file_in_the_way_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dir.mem").mkdir()
    with pytest.raises(MemoryFileError, match=r"dir\.mem: it is a directory"):
        plain_memory().save(tmp_path / "dir.mem")
    with pytest.raises(MemoryFileError, match="is a directory"):
        Memory.load(tmp_path / "dir.mem")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MemoryFileError, match=r"file is not a directory"):
        plain_memory().save(tmp_path / "file" / "a.mem")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.mem", "file"]  # no lock file left about


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_write_errors_become_one_line_messages_and_keep_the_old_version(tmp_path: Path, monkeypatch, code: int) -> None:
    path = tmp_path / "m.mem"
    old = mplus_memory()
    old.save(path, shard_bytes=SHARD_BYTES)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls = []

    def failing(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # one new shard is already written
            raise OSError(code, os.strerror(code))
        from safetensors.torch import save_file

        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr("memllm.core.memory.save_file", failing)
    with pytest.raises(MemoryFileError, match=rf"^cannot save memory .*m\.mem: {os.strerror(code)}") as e:
        mplus_memory(seed=1).save(path, shard_bytes=SHARD_BYTES)
    assert "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert same(Memory.load(path), old)
    assert all(Path(f).parent.name.startswith(".m.mem.") for f in calls)  # temp names say whose they are


def test_next_save_sweeps_this_memorys_leftovers_only(tmp_path: Path) -> None:
    path = tmp_path / "a.mem"
    mplus_memory().save(path, shard_bytes=SHARD_BYTES)
    leftovers = [".a.mem.0123abcd.tmp", "a.mem.89abcdef.ltm-00000.safetensors"]
    foreign = [".a.mem.bak.0123abcd.tmp", "a.mem.bak.89abcdef.ltm-00000.safetensors", ".a.mem.note.tmp", "x.tmp"]
    for name in leftovers + foreign:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".a.mem.fedcba98.tmp").mkdir()  # a killed save's directory, with safetensors' own temp file
    (tmp_path / ".a.mem.fedcba98.tmp" / ".tmpAbC123").write_bytes(b"x")
    past = time.time() - 60
    for p in tmp_path.iterdir():
        os.utime(p, (past, past))
    mplus_memory().save(path, shard_bytes=SHARD_BYTES)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.mem", "a.mem.lock", *foreign, *listed_shards(path)])


# ---- item 6: the header is checked ---------------------------------------------------------------


def test_edited_num_updates_is_refused_as_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "a.mem"
    memory = plain_memory()
    memory.num_updates = 3
    memory.save(path)
    rewrite_header(path, num_updates="7")
    with pytest.raises(MemoryFileError, match="corrupt: checksum mismatch"):
        Memory.load(path)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_updates", "many"), ("num_updates", "-1"), ("num_updates", "1.5"), ("num_updates", None),
        ("initialized", "maybe"), ("initialized", '"yes"'), ("initialized", None),
        ("format_version", "two"), ("format_version", "0"), ("format_version", None),
        ("fingerprint", ""), ("fingerprint", None),
        ("checksum", "abc"), ("checksum", None),
        ("generation", "../../x"),
        ("ltm", "{not json"), ("ltm", "[1, 2]"), ("ltm", '{"num_tokens": "four"}'), ("ltm", '{"bogus": 1}'),
        ("ltm", "{}"),
        ("shards", "{"), ("shards", '{"file": "x"}'), ("shards", '[{"file": 3, "checksum": "x"}]'), ("shards", "[1]"),
    ],
)
def test_bad_header_field_gives_an_error_naming_it(tmp_path: Path, field: str, value: str | None) -> None:
    path = tmp_path / "m.mem"
    mplus_memory().save(path, shard_bytes=SHARD_BYTES)
    rewrite_header(path, **{field: value})
    for verify in (True, False):
        with pytest.raises(MemoryFileError, match=f"bad header field '{field}'") as e:
            Memory.load(path, verify=verify)
        assert "\n" not in str(e.value)


def test_newer_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.mem"
    plain_memory().save(path)
    rewrite_header(path, format_version="99")
    with pytest.raises(MemoryFileError, match="newer memllm"):
        Memory.load(path)


def test_version_1_files_still_load(tmp_path: Path) -> None:
    """Format 1 (memllm before issue 10): the checksum covered the tensors only."""
    from safetensors.torch import save_file

    from memllm.core.memory import _checksum

    memory = mplus_memory()
    tensors = {k: v.contiguous() for k, v in memory.tensors().items()}
    save_file(tensors, tmp_path / "old.mem", metadata={
        "format": "memllm-memory", "format_version": "1", "fingerprint": "test-model", "initialized": "true",
        "num_updates": "0", "ltm": json.dumps({"num_tokens": 4, "num_ltm_blocks": 2}), "checksum": _checksum(tensors),
    })
    assert same(Memory.load(tmp_path / "old.mem"), memory)
    memory.save(tmp_path / "old.mem")  # rewritten in the current format
    assert read_header(tmp_path / "old.mem")["format_version"] == str(FORMAT_VERSION)
    assert same(Memory.load(tmp_path / "old.mem"), memory)


# ---- the kill -9 trial ---------------------------------------------------------------------------


def _save_forever(directory: str, ready) -> None:
    """Save both memories over and over, each version a consistent (pool, num_updates) pair."""
    plain, mplus = plain_memory(), mplus_memory(rows=SAVER_ROWS)  # 3 shards a save
    base_plain, base_mplus = plain.pool, mplus.pool
    while True:
        for memory, base, name in ((plain, base_plain, "plain.mem"), (mplus, base_mplus, "mplus.mem")):
            memory.num_updates += 1
            memory.pool = base + memory.num_updates
            memory.save(Path(directory) / name, shard_bytes=SHARD_BYTES * 4)
        ready.set()


def kill_trials(directory: Path, trials: int, seed: int = 0) -> dict[str, int]:
    """Kill a saving process at random points; after each kill both memories must load, and one more
    save must leave exactly the memory files. Returns counts of what the kills left behind."""
    rng = random.Random(seed)
    context = multiprocessing.get_context("fork")
    counts = {"trials": 0, "loadable": 0, "left_temp_files": 0}
    for _ in range(trials):
        ready = context.Event()
        saver = context.Process(target=_save_forever, args=(str(directory), ready))
        saver.start()
        assert ready.wait(60)
        time.sleep(rng.uniform(0, 0.3))
        os.kill(saver.pid, signal.SIGKILL)
        saver.join()
        counts["trials"] += 1
        if any(p.name.endswith(".tmp") for p in directory.iterdir()):
            counts["left_temp_files"] += 1
        loaded = {name: Memory.load(directory / name) for name in ("plain.mem", "mplus.mem")}
        bases = {"plain.mem": plain_memory().pool, "mplus.mem": mplus_memory(rows=SAVER_ROWS).pool}
        for name, memory in loaded.items():
            assert torch.equal(memory.pool, bases[name] + memory.num_updates)  # one consistent version
        counts["loadable"] += 1
        for name, memory in loaded.items():
            memory.save(directory / name, shard_bytes=SHARD_BYTES * 4)
        names = {p.name for p in directory.iterdir()} - {"plain.mem.lock", "mplus.mem.lock"}
        assert names == {"plain.mem", "mplus.mem", *listed_shards(directory / "mplus.mem")}
    return counts


def test_kill_9_during_saves_leaves_loadable_memories_and_no_leftovers(tmp_path: Path) -> None:
    counts = kill_trials(tmp_path, trials=8)
    assert counts["loadable"] == 8


@pytest.mark.slow
def test_kill_9_during_saves_100_trials(tmp_path: Path) -> None:
    counts = kill_trials(tmp_path, trials=100, seed=1)
    assert counts["loadable"] == 100 and counts["left_temp_files"] > 0  # the kills did land inside saves
