"""Durable memories for the server: immutable versions in blob storage, a catalogue in SQL.

- **Blobs** (fsspec: a local directory by default, any fsspec URL such as ``s3://bucket/prefix``):
  every version of a memory is its own folder ``<memory id>/v<version>-<token>/`` holding the memory in
  the library's file format (``memory.mem`` plus its long-term shards), written once and never changed;
  the token makes each write attempt's folder unique, so a writer that loses a race never touches the
  winner's files.
- **Catalogue** (SQLAlchemy: an embedded SQLite file by default, PostgreSQL by URL): tenants, API keys
  (hashed), memories with their current version, versions, and updates (id, time, tokens, source hash,
  key id, and the text when kept).

A version exists once its catalogue row is committed, and that row is written only after its files are
complete, so a crash at any point leaves the catalogue pointing at whole versions; folders of versions
that never committed are ignored (and swept by `sweep`). Writers advance a memory with a version
compare-and-swap (`UPDATE ... WHERE version = expected`): a writer that lost the race gets
`VersionConflict` and retries from the new version, so no write is lost, across processes too.

Ids are generated here (``mem_`` + 16 hex digits, ``upd_...``, ``key_...``) and validated on the way in:
no user input becomes a path.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import sqlalchemy as sa

from memllm.core.memory import Memory

MEMORY_ID = re.compile(r"^mem_[0-9a-f]{16}$")
TENANT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MEMORY_FILE = "memory.mem"

metadata = sa.MetaData()
tenants = sa.Table("tenants", metadata, sa.Column("id", sa.String(64), primary_key=True),
                   sa.Column("created", sa.Float, nullable=False))
api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("id", sa.String(32), primary_key=True),  # public part of the key: key_<hex>
    sa.Column("tenant", sa.String(64), sa.ForeignKey("tenants.id"), nullable=True),  # NULL: admin
    sa.Column("secret_sha256", sa.String(64), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("revoked", sa.Boolean, nullable=False, default=False),
)
memories = sa.Table(
    "memories", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("tenant", sa.String(64), sa.ForeignKey("tenants.id"), nullable=False, index=True),
    sa.Column("name", sa.String(200), nullable=False, default=""),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),  # the current version
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False, default=False),
)
versions = sa.Table(
    "versions", metadata,
    sa.Column("memory", sa.String(32), sa.ForeignKey("memories.id"), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("updates", sa.Integer, nullable=False),  # the memory's update count at this version
    sa.Column("parent", sa.Integer, nullable=True),  # the version it was made from
    sa.Column("folder", sa.String(64), nullable=False),  # v<version>-<token>: unique per write attempt
    sa.Column("pruned", sa.Boolean, nullable=False, default=False),  # files removed by retention
)
updates = sa.Table(
    "updates", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("memory", sa.String(32), sa.ForeignKey("memories.id"), nullable=False, index=True),
    sa.Column("version", sa.Integer, nullable=False),  # the version this update produced
    sa.Column("seq", sa.Integer, nullable=False),  # order within that version (batch injections)
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("tokens", sa.Integer, nullable=False),
    sa.Column("source_sha256", sa.String(64), nullable=False),
    sa.Column("key", sa.String(32), nullable=True),
    sa.Column("text", sa.Text, nullable=True),  # kept only when the store keeps texts
)


class StoreError(ValueError):
    """A request the store refuses (the message is safe to show to the client)."""


class NotFound(StoreError):
    pass


class VersionConflict(StoreError):
    """Another writer advanced the memory first: reload and retry."""


@dataclass(frozen=True)
class Update:
    """One text written into a memory, as the catalogue records it. The id is made before the text
    is injected, so that the rows its injection drops can be drawn from it (`update_seed`): the
    history then replays to the same memory."""

    text: str
    tokens: int
    key: str | None = None
    id: str = field(default_factory=lambda: new_update_id())

    @property
    def source_sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


@dataclass(frozen=True)
class MemoryRecord:
    id: str
    tenant: str
    name: str
    fingerprint: str
    version: int
    created: float
    updates: int


@dataclass(frozen=True)
class Key:
    id: str
    tenant: str | None  # None: an admin key

    @property
    def admin(self) -> bool:
        return self.tenant is None


def new_update_id() -> str:
    return "upd_" + secrets.token_hex(8)


def update_seed(update_id: str) -> int:
    """The seed of the drop draw of an update: a function of its id alone."""
    return int.from_bytes(hashlib.sha256(update_id.encode()).digest()[:8], "little") >> 1


def check_memory_id(memory_id: str) -> str:
    if not isinstance(memory_id, str) or not MEMORY_ID.match(memory_id):
        raise NotFound(f"no memory {memory_id[:80]!r}")
    return memory_id


class Store:
    """The catalogue plus blob storage. Safe to share between threads and processes: every change is
    one database transaction, and version folders are never rewritten."""

    def __init__(self, blobs: str, catalogue: str | None = None, keep_texts: bool = True, retention: int = 20):
        """blobs: a directory or fsspec URL; catalogue: an SQLAlchemy URL (default: SQLite file
        ``catalogue.db`` in `blobs` when that is a local directory); retention: versions whose files
        are kept per memory (older ones stay in the history, their files removed)."""
        self.fs, self.root = fsspec.core.url_to_fs(blobs)
        self.local = self.fs.protocol in ("file", ("file", "local")) or "file" in (self.fs.protocol or ())
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)
        if catalogue is None:
            if not self.local:
                raise StoreError("a remote blob store needs a catalogue URL (e.g. postgresql://...)")
            catalogue = f"sqlite:///{Path(self.root) / 'catalogue.db'}"
        self.engine = sa.create_engine(catalogue, **_engine_options(catalogue))
        metadata.create_all(self.engine)
        self.keep_texts = keep_texts
        self.retention = max(1, retention)

    # ---- tenants and keys ----------------------------------------------------------------------

    def create_tenant(self, tenant: str) -> None:
        if not TENANT_ID.match(tenant or ""):
            raise StoreError("tenant ids are 1-64 letters, digits, '_', '.' or '-'")
        try:
            with self.engine.begin() as db:
                if db.execute(sa.select(tenants.c.id).where(tenants.c.id == tenant)).first() is None:
                    db.execute(tenants.insert().values(id=tenant, created=time.time()))
        except sa.exc.IntegrityError:  # another writer created it between our read and our insert
            pass

    def create_key(self, tenant: str | None) -> str:
        """A new API key for `tenant` (None: an admin key). The secret is returned once and stored hashed."""
        if tenant is not None:
            self.create_tenant(tenant)
        key_id, secret = "key_" + secrets.token_hex(8), secrets.token_urlsafe(32)
        with self.engine.begin() as db:
            db.execute(api_keys.insert().values(id=key_id, tenant=tenant, secret_sha256=_sha256(secret),
                                                created=time.time(), revoked=False))
        return f"mk-{key_id}-{secret}"

    def authenticate(self, token: str) -> Key | None:
        """The key a bearer token stands for, or None (unknown, malformed or revoked)."""
        parts = (token or "").split("-", 2)
        if len(parts) != 3 or parts[0] != "mk" or not re.fullmatch(r"key_[0-9a-f]{16}", parts[1]):
            return None
        with self.engine.connect() as db:
            row = db.execute(sa.select(api_keys).where(api_keys.c.id == parts[1])).first()
        if row is None or row.revoked or not hmac.compare_digest(row.secret_sha256, _sha256(parts[2])):
            return None
        return Key(row.id, row.tenant)

    def list_keys(self) -> list[dict]:
        with self.engine.connect() as db:
            rows = db.execute(sa.select(api_keys.c.id, api_keys.c.tenant, api_keys.c.created, api_keys.c.revoked)
                              .order_by(api_keys.c.created)).all()
        return [{"id": r.id, "tenant": r.tenant, "admin": r.tenant is None, "created": r.created,
                 "revoked": r.revoked} for r in rows]

    def revoke_key(self, key_id: str) -> None:
        with self.engine.begin() as db:
            if db.execute(api_keys.update().where(api_keys.c.id == key_id).values(revoked=True)).rowcount == 0:
                raise NotFound(f"no key {key_id[:40]!r}")

    # ---- memories ------------------------------------------------------------------------------

    def create(self, tenant: str, memory: Memory, name: str = "", parent: tuple[str, int] | None = None) -> MemoryRecord:
        """A new memory holding `memory` as its version 1."""
        self.create_tenant(tenant)
        memory_id = "mem_" + secrets.token_hex(8)
        folder = self._write_files(memory_id, 1, memory)
        now = time.time()
        with self.engine.begin() as db:
            db.execute(memories.insert().values(id=memory_id, tenant=tenant, name=name[:200],
                                                fingerprint=memory.fingerprint, version=1, created=now,
                                                deleted=False))
            db.execute(versions.insert().values(memory=memory_id, version=1, created=now,
                                                updates=memory.num_updates, parent=None, pruned=False,
                                                folder=folder))
        return self.get(tenant, memory_id)

    def get(self, tenant: str, memory_id: str) -> MemoryRecord:
        """The memory's record; NotFound for another tenant's memory, as for one that does not exist."""
        check_memory_id(memory_id)
        found = self._records(tenant, memories.c.id == memory_id)
        if not found:
            raise NotFound(f"no memory {memory_id!r}")
        return found[0]

    def owner(self, memory_id: str) -> str:
        """The tenant of a live memory: for a Ray Serve replica loading the memory a request names before
        the app has authenticated it (the app then refuses another tenant's request as usual)."""
        check_memory_id(memory_id)
        with self.engine.connect() as db:
            tenant = db.execute(sa.select(memories.c.tenant).where(memories.c.id == memory_id,
                                                                   ~memories.c.deleted)).scalar()
        if tenant is None:
            raise NotFound(f"no memory {memory_id!r}")
        return tenant

    def list(self, tenant: str) -> list[MemoryRecord]:
        return self._records(tenant)

    def _records(self, tenant: str, *where) -> list[MemoryRecord]:
        """The tenant's live memories (matching `where`), oldest first, each with its current version's
        update count: one query."""
        current = sa.and_(versions.c.memory == memories.c.id, versions.c.version == memories.c.version)
        query = (sa.select(memories, versions.c.updates).join(versions, current)
                 .where(memories.c.tenant == tenant, ~memories.c.deleted, *where).order_by(memories.c.created))
        with self.engine.connect() as db:
            rows = db.execute(query).all()
        return [MemoryRecord(r.id, r.tenant, r.name, r.fingerprint, r.version, r.created, r.updates) for r in rows]

    def load(self, tenant: str, memory_id: str, version: int | None = None, device: str = "cpu") -> tuple[Memory, int]:
        """(the memory at `version` (default: current), that version)."""
        record = self.get(tenant, memory_id)
        version = record.version if version is None else int(version)
        with self.engine.connect() as db:
            row = db.execute(sa.select(versions).where(versions.c.memory == memory_id,
                                                       versions.c.version == version)).first()
        if row is None:
            raise NotFound(f"memory {memory_id!r} has no version {version}")
        if row.pruned:
            raise NotFound(f"version {version} of {memory_id!r} is past the retention of {self.retention} versions")
        with self._local_copy(memory_id, row.folder) as folder:
            return Memory.load(folder / MEMORY_FILE, device=device), version

    def commit(self, tenant: str, memory_id: str, expected: int, memory: Memory, written: list[Update]) -> tuple[int, list[str]]:
        """Store `memory` as the version after `expected`, recording the updates that produced it.

        Returns (new version, update ids). Raises VersionConflict when the memory is no longer at
        `expected` (another writer came first): nothing is recorded then."""
        record = self.get(tenant, memory_id)
        if record.version != expected:
            raise VersionConflict(f"memory {memory_id} is at version {record.version}, not {expected}")
        new = expected + 1
        folder = self._write_files(memory_id, new, memory)
        now = time.time()
        ids = [u.id for u in written]
        with self.engine.begin() as db:
            moved = db.execute(memories.update().where(memories.c.id == memory_id, memories.c.version == expected,
                                                       ~memories.c.deleted).values(version=new)).rowcount
            if moved != 1:
                raise VersionConflict(f"memory {memory_id} moved past version {expected}")
            db.execute(versions.insert().values(memory=memory_id, version=new, created=now,
                                                updates=memory.num_updates, parent=expected, pruned=False,
                                                folder=folder))
            for seq, (uid, u) in enumerate(zip(ids, written)):
                db.execute(updates.insert().values(id=uid, memory=memory_id, version=new, seq=seq, time=now,
                                                   tokens=u.tokens, source_sha256=u.source_sha256, key=u.key,
                                                   text=u.text if self.keep_texts else None))
        self._apply_retention(memory_id)
        return new, ids

    def restore(self, tenant: str, memory_id: str, version: int) -> int:
        """Roll back: the state of `version` becomes a new current version (history is kept)."""
        memory, _ = self.load(tenant, memory_id, version)
        current = self.get(tenant, memory_id).version
        return self.commit(tenant, memory_id, current, memory, [])[0]

    def fork(self, tenant: str, memory_id: str, name: str = "") -> MemoryRecord:
        memory, version = self.load(tenant, memory_id)
        return self.create(tenant, memory, name=name or f"fork of {memory_id} v{version}")

    def delete(self, tenant: str, memory_id: str) -> None:
        self.get(tenant, memory_id)
        with self.engine.begin() as db:
            db.execute(memories.update().where(memories.c.id == memory_id).values(deleted=True))
        self.fs.rm(self._folder(memory_id), recursive=True)

    def history(self, tenant: str, memory_id: str) -> list[dict]:
        self.get(tenant, memory_id)
        with self.engine.connect() as db:
            rows = db.execute(sa.select(updates).where(updates.c.memory == memory_id)
                              .order_by(updates.c.version, updates.c.seq)).all()
        return [{"id": r.id, "version": r.version, "seq": r.seq, "time": r.time, "tokens": r.tokens,
                 "source_sha256": r.source_sha256, "key": r.key, "text": r.text} for r in rows]

    def versions(self, tenant: str, memory_id: str) -> list[dict]:
        self.get(tenant, memory_id)
        with self.engine.connect() as db:
            rows = db.execute(sa.select(versions).where(versions.c.memory == memory_id)
                              .order_by(versions.c.version)).all()
        return [{"version": r.version, "created": r.created, "updates": r.updates, "parent": r.parent,
                 "available": not r.pruned} for r in rows]

    def export(self, tenant: str, memory_id: str, version: int | None = None) -> bytes:
        """The memory file of a version, self-contained (long-term shards folded in)."""
        memory, _ = self.load(tenant, memory_id, version)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / MEMORY_FILE
            memory.save(path, shard_bytes=1 << 62)
            return path.read_bytes()

    def sweep(self) -> int:
        """Remove version folders that no committed version points at (left by crashes); returns how many."""
        removed = 0
        with self.engine.connect() as db:
            live = {(r.memory, r.folder) for r in db.execute(sa.select(versions.c.memory, versions.c.folder)
                                                              .where(~versions.c.pruned))}
        for folder in self.fs.glob(f"{self.root}/mem_*/v*"):
            memory_id, name = folder.rstrip("/").split("/")[-2:]
            if MEMORY_ID.match(memory_id) and (memory_id, name) not in live:
                self.fs.rm(folder, recursive=True)
                removed += 1
        return removed

    # ---- files ---------------------------------------------------------------------------------

    def _folder(self, memory_id: str, folder: str | None = None) -> str:
        check_memory_id(memory_id)
        return f"{self.root}/{memory_id}" + (f"/{folder}" if folder else "")

    def _write_files(self, memory_id: str, version: int, memory: Memory) -> str:
        """Write a version's files into a new folder of their own, completely, before any catalogue row
        can point at it; returns the folder's name."""
        folder = f"v{version:08d}-{secrets.token_hex(4)}"
        target = self._folder(memory_id, folder)
        with tempfile.TemporaryDirectory() as tmp:
            memory.save(Path(tmp) / MEMORY_FILE)
            if self.local:
                staging = Path(f"{target}.tmp")
                shutil.copytree(tmp, staging, ignore=shutil.ignore_patterns("*.lock"))
                staging.rename(target)  # atomic: the folder appears whole
                _fsync_dir(staging.parent)
            else:
                self.fs.put(tmp + "/", target, recursive=True)
        return folder

    @contextmanager
    def _local_copy(self, memory_id: str, folder: str) -> Iterator[Path]:
        path = self._folder(memory_id, folder)
        if self.local:
            yield Path(path)
            return
        with tempfile.TemporaryDirectory() as tmp:
            self.fs.get(path + "/", tmp, recursive=True)
            yield Path(tmp)

    def _apply_retention(self, memory_id: str) -> None:
        with self.engine.begin() as db:
            old = db.execute(sa.select(versions.c.version, versions.c.folder)
                             .where(versions.c.memory == memory_id, ~versions.c.pruned)
                             .order_by(versions.c.version.desc()).offset(self.retention)).all()
            for v in old:
                db.execute(versions.update().where(versions.c.memory == memory_id, versions.c.version == v.version)
                           .values(pruned=True))
        for v in old:
            path = self._folder(memory_id, v.folder)
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _engine_options(url: str) -> dict:
    if url.startswith("sqlite"):
        # one file shared by threads (and processes): wait for locks instead of failing at once
        return {"connect_args": {"timeout": 30, "check_same_thread": False}}
    return {"pool_pre_ping": True}
