"""Start the server: the model, the store and the app under uvicorn (`memllm serve`); `--ray` runs the
same app on Ray Serve replicas instead (`memllm.serve.ray_serve`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from memllm.serve.app import Limits, create_app
from memllm.serve.store import Store
from memllm.serve.worker import Worker

if TYPE_CHECKING:
    from fastapi import FastAPI


@dataclass
class ServeConfig:
    """What one server process, or each Ray Serve replica, runs."""

    store: str  # where memories live: a directory or an fsspec URL
    model: str = "tiny-memoryllm"  # a checkpoint directory or a shipped name
    catalogue: str | None = None  # SQLAlchemy URL (default: SQLite in the store directory)
    name: str | None = None  # the model's name in the API (default: the last part of `model`)
    limits: Limits = field(default_factory=Limits)
    keep_texts: bool = True
    retention: int = 20  # versions per memory whose files are kept
    threads: int | None = None  # torch threads
    max_batch: int = 64  # questions the worker answers together (1: one at a time)
    cache_bytes: int = 1 << 30  # memories kept loaded (least recently used out first)
    prefix_cache_bytes: int = 1 << 30  # their ready key/value prefixes, in the model (least recently used out first)

    def open_store(self) -> Store:
        return Store(self.store, self.catalogue, keep_texts=self.keep_texts, retention=self.retention)

    def build(self) -> "FastAPI":
        """Load the model, open the store and start the worker: the app, ready to serve."""
        import torch

        from memllm.core.checkpoint import load

        if self.threads:
            torch.set_num_threads(self.threads)
        lm = load(self.model)
        lm.prefix_cache_bytes = self.prefix_cache_bytes
        store = self.open_store()
        worker = Worker(lm, store, max_batch=self.max_batch, cache_bytes=self.cache_bytes)
        return create_app(lm, store, model_name=self.name or self.model.rstrip("/").rsplit("/", 1)[-1],
                          limits=self.limits, worker=worker)


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until stopped, in this process."""
    import uvicorn

    uvicorn.run(config.build(), host=host, port=port, log_level="warning")
