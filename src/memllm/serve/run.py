"""Start the server: the model, the store and the app under uvicorn (`memllm serve`)."""

from __future__ import annotations

from memllm.core.checkpoint import load
from memllm.serve.app import Limits, create_app
from memllm.serve.store import Store
from memllm.serve.worker import Worker


def serve(model: str, store: str, catalogue: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          name: str | None = None, limits: Limits | None = None, keep_texts: bool = True, retention: int = 20,
          threads: int | None = None, max_batch: int = 64, cache_bytes: int = 1 << 30) -> None:
    """Serve `model` (a checkpoint directory or a shipped name) with memories in `store` (a directory or
    fsspec URL; `catalogue` an SQLAlchemy URL, default SQLite in the store directory) until stopped.
    `max_batch`: questions the worker answers together (1: one at a time); `cache_bytes`: memories
    kept loaded."""
    import torch
    import uvicorn

    if threads:
        torch.set_num_threads(threads)
    lm = load(model)
    memories = Store(store, catalogue, keep_texts=keep_texts, retention=retention)
    app = create_app(lm, memories, model_name=name or model.rstrip("/").rsplit("/", 1)[-1], limits=limits,
                     worker=Worker(lm, memories, max_batch=max_batch, cache_bytes=cache_bytes))
    uvicorn.run(app, host=host, port=port, log_level="warning")
