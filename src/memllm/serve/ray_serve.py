"""`memllm serve --ray --replicas N`: the same app on N Ray Serve replicas, each request routed by its memory.

A `Router` deployment takes the HTTP requests, reads the memory a request names (the path
``/v1/memories/{id}/...``, else the body's `memory` field or the last part of its `model` field, as the
app reads them) and forwards the request to a `Replica` with that memory id as Ray Serve's multiplexed
model id (what the ``serve_multiplexed_model_id`` header sets for a request from outside). Ray routes it
to a replica that has the memory loaded, and so its prefix cached, or else to the replica holding the
fewest, which loads it (`Replica.hot`). Each replica runs `create_app` with a model and a worker of its
own over the shared store (catalogue and blobs); a memory's writes stay ordered across replicas by the
store's version compare-and-swap: a write that lost the race is replayed on the new version.

Ray is an optional dependency (``pip install -e ".[ray]"``), imported only by this module.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp

from memllm.serve.app import announced_too_large, error_body, memory_of
from memllm.serve.run import ServeConfig
from memllm.serve.store import MEMORY_ID, NotFound
from memllm.serve.worker import Load

APP_NAME = "memllm"
REPLICA_HEADER = "x-memllm-replica"  # on every response: the replica that answered
# Memories one replica claims for routing; what stays loaded is bounded by bytes (ServeConfig.cache_bytes).
ROUTED_MEMORIES_PER_REPLICA = 256
COMPLETIONS = ("/v1/chat/completions", "/v1/completions")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Forwarded:
    """An HTTP request as the router hands it to a replica."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


def memory_id_of(path: str, body: bytes) -> str:
    """The memory a request names, or "" for none (Ray then routes it to any replica)."""
    parts = path.strip("/").split("/")
    if len(parts) >= 3 and parts[:2] == ["v1", "memories"] and MEMORY_ID.match(parts[2]):
        return parts[2]
    if path.rstrip("/") not in COMPLETIONS:
        return ""
    try:
        fields = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(fields, dict) or not isinstance(fields.get("model"), str):
        return ""
    memory = fields.get("memory")
    named = memory_of(fields["model"], memory if isinstance(memory, str) else None)
    return named if MEMORY_ID.match(named) else ""


async def asgi_messages(app: ASGIApp, request: Forwarded) -> AsyncIterator[dict]:
    """Run one request through an ASGI app in this process, yielding the messages the app sends as it
    sends them (httpx's ASGITransport would hold a streamed answer back until its end)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
             "scheme": "http", "path": request.path, "raw_path": request.path.encode(), "root_path": "",
             "query_string": request.query, "headers": request.headers, "client": None, "server": None}
    pending = [{"type": "http.request", "body": request.body, "more_body": False}]
    sent: asyncio.Queue[dict | None] = asyncio.Queue()
    finished = asyncio.Event()

    async def receive() -> dict:
        if pending:
            return pending.pop()
        await finished.wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(scope, receive, sent.put)
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    started = False
    try:
        while (message := await sent.get()) is not None:
            started = True
            yield message
        try:
            await task
        except Exception:
            if not started:
                raise
            log.exception("the app failed after its response began")  # as uvicorn would log it
    finally:
        finished.set()
        task.cancel()


@serve.deployment
class Replica:
    """One model, worker and app over the shared store; the memories it has loaded are its multiplexed
    models, so Ray sends their requests here."""

    def __init__(self, config: ServeConfig) -> None:
        self.app = config.build()
        self.worker = self.app.state.worker
        self.name = serve.get_replica_context().replica_id.unique_id

    @serve.multiplexed(max_num_models_per_replica=ROUTED_MEMORIES_PER_REPLICA)
    async def hot(self, memory_id: str) -> int:
        """Load a memory into this replica's worker; returns the version loaded. It is loaded before the
        request naming it is authenticated: the app then refuses that request as it would any other."""
        return await asyncio.wrap_future(self.worker.submit(Load(memory_id)))

    async def handle(self, request: Forwarded) -> AsyncIterator[dict]:
        """The app's answer to a request, as ASGI messages (the first one starts the response)."""
        memory_id = serve.get_multiplexed_model_id()
        if memory_id:
            try:
                await self.hot(memory_id)
            except NotFound:
                pass  # no such live memory: the app answers 404 below
        async for message in asgi_messages(self.app, request):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REPLICA_HEADER.encode(), self.name.encode())]}
            yield message


@serve.deployment
class Router:
    """The HTTP ingress: forwards each request to a replica chosen by the memory it names."""

    def __init__(self, replicas: DeploymentHandle, max_body_bytes: int) -> None:
        self.replicas = replicas.options(stream=True)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, request: Request) -> Response:
        too_large = JSONResponse(error_body(f"request body over {self.max_body_bytes} bytes"), status_code=413)
        if announced_too_large(request.headers.get("content-length"), self.max_body_bytes):
            return too_large  # before it is read, as the app refuses it
        received = bytearray()
        async for chunk in request.stream():  # a chunked body announces no length: count it as it comes
            received += chunk
            if len(received) > self.max_body_bytes:
                return too_large
        body = bytes(received)
        forwarded = Forwarded(request.method, request.url.path, request.url.query.encode(),
                              list(request.headers.raw), body)
        handle = self.replicas.options(multiplexed_model_id=memory_id_of(forwarded.path, body))
        messages = handle.handle.remote(forwarded)
        start = await messages.__anext__()

        async def chunks() -> AsyncIterator[bytes]:
            async for message in messages:
                if message["type"] == "http.response.body":
                    yield message.get("body", b"")

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.get("headers", [])}
        return StreamingResponse(chunks(), status_code=start["status"], headers=headers)


def application(config: ServeConfig, replicas: int) -> Application:
    """The router in front of `replicas` replicas of the app, for `serve.run`."""
    replica = Replica.options(num_replicas=replicas, max_ongoing_requests=max(8, config.max_batch),
                              ray_actor_options={"num_cpus": config.threads or 1})
    router = Router.options(max_ongoing_requests=config.limits.max_in_flight, ray_actor_options={"num_cpus": 0})
    return router.bind(replica.bind(config), config.limits.max_body_bytes)


def serve_ray(config: ServeConfig, replicas: int, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve on the Ray cluster that RAY_ADDRESS names (else a local one) until interrupted."""
    import ray

    # replicas run in other processes, perhaps other directories: local paths are made absolute
    store = config.store if "://" in config.store else str(Path(config.store).resolve())
    model = str(Path(config.model).resolve()) if Path(config.model).exists() else config.model
    config = dataclasses.replace(config, store=store, model=model)
    config.open_store()  # the catalogue's tables exist before the replicas start, and a bad URL fails here, once
    ray.init()
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(config, replicas), name=APP_NAME, route_prefix="/", blocking=True)
