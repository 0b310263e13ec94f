"""`memllm serve`: many durable memories behind one model, over an OpenAI-compatible HTTP API.

    POST /v1/chat/completions, /v1/completions   (stream: server-sent events, as OpenAI's)
    GET  /v1/models                              the model and every memory of the caller's tenant
    /v1/memories ...                             create, list, get, inject, fork, history, versions,
                                                 restore, export, import, delete

A request reads the memory named by its `model` field (``<memory id>`` or ``<model>/<memory id>``) or,
equivalently, by an extra body field ``memory``. Every request carries an API key (``Authorization:
Bearer mk-...``); a key belongs to one tenant and sees only that tenant's memories (others' are 404,
as if they did not exist). Keys are made with ``memllm serve keys create``.
The model is used by one worker thread (`memllm.serve.worker`); memories live in a `Store`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from memllm.core.memory import Memory, MemoryFileError, MemoryMismatchError
from memllm.core.model import MemoryModel
from memllm.serve.store import Key, MemoryRecord, NotFound, Store, StoreError, VersionConflict
from memllm.serve.worker import Ask, Inject, Stream, Worker


@dataclass
class Limits:
    """What one request may ask for; beyond it the request is refused with 4xx, before any work."""

    max_body_bytes: int = 4 << 20
    max_text_chars: int = 100_000
    max_tokens: int = 256
    max_batch_texts: int = 64
    max_in_flight: int = 256


# ---- request bodies (the OpenAPI schema is generated from them) ---------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str


class ErrorBody(BaseModel):
    error: ErrorDetail | None = None
    detail: Any = None


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    memory: str | None = None
    write_to_memory: bool = Field(default=False, description="also inject the turn (question and answer)")


class CompletionRequest(BaseModel):
    model: str
    prompt: str
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    memory: str | None = None


class CreateMemory(BaseModel):
    name: str = Field(default="", max_length=200)


class InjectRequest(BaseModel):
    text: str | None = None
    texts: list[str] | None = None


class ForkRequest(BaseModel):
    name: str = Field(default="", max_length=200)


def memory_of(model_field: str, memory_field: str | None) -> str:
    """The memory a completion reads: the `memory` field, else the last part of `model`. The worker
    checks that the caller's tenant owns it (404 otherwise) when it loads it."""
    return memory_field or model_field.rsplit("/", 1)[-1]


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes")


def announced_too_large(content_length: str | None, limit: int) -> bool:
    """Does a request's Content-Length header (None: absent) announce a body over `limit` bytes (or
    is it no number at all)?"""
    return content_length is not None and (not content_length.isdigit() or int(content_length) > limit)


class RequestLimits:
    """ASGI middleware holding every request to the limits before the app sees it: a body whose
    Content-Length announces more than `max_body` bytes is refused (413), as is a request past
    `max_in_flight` in flight (429); a body no Content-Length announces (a chunked upload) is counted
    as it arrives, and the endpoint's read of it raises BodyTooLarge (413) once the bytes received pass
    the limit, before more are buffered. Plain ASGI, not `@app.middleware("http")`: that wrapper costs
    a task and a stream to every request."""

    def __init__(self, app, max_body: int, max_in_flight: int) -> None:
        self.app, self.limit = app, max_body
        self.in_flight, self.max_in_flight = 0, max_in_flight

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"content-length"), None)
        if announced_too_large(length, self.limit):
            return await JSONResponse(error_body(f"request body over {self.limit} bytes"), 413)(scope, receive, send)
        if self.in_flight >= self.max_in_flight:
            return await JSONResponse(error_body("too many requests in flight; retry later"), 429)(scope, receive, send)
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        self.in_flight += 1  # one event loop: no lock needed
        try:
            await self.app(scope, counted, send)
        finally:
            self.in_flight -= 1


async def caller(request: Request) -> Key:
    """The API key of a request (a tenant's key: admin keys manage keys, not memories).

    Run on the event loop, not in a thread: the lookup is one indexed read of the catalogue (about
    0.1 ms in SQLite), cheaper than the hop to a worker thread that a plain `def` dependency costs
    on every request."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    key = request.app.state.store.authenticate(token.strip()) if scheme.lower() == "bearer" else None
    if key is None:
        raise HTTPException(401, "a valid API key is needed: Authorization: Bearer mk-...")
    if key.admin:
        raise HTTPException(403, "an admin key manages keys; use a tenant's key for memories")
    return key


Caller = Annotated[Key, Depends(caller)]


def create_app(model: MemoryModel, store: Store, model_name: str = "memllm", limits: Limits | None = None,
               worker: Worker | None = None) -> FastAPI:
    """The HTTP app for `model` and `store` (uvicorn, Ray Serve and tests all run this one)."""
    limits = limits or Limits()
    worker = worker or Worker(model, store)
    errors = {status: {"model": ErrorBody, "description": why} for status, why in (
        (400, "bad input"), (401, "no valid API key"), (403, "an admin key used for memories"),
        (404, "no such memory (or another tenant's)"), (409, "other writers kept winning; retry"), (413, "over a size limit"), (429, "too many requests in flight"))}
    app = FastAPI(title="memllm", version="1", description=__doc__.split("\n\n")[0], responses=errors)
    app.state.worker, app.state.store = worker, store
    app.add_middleware(RequestLimits, max_body=limits.max_body_bytes, max_in_flight=limits.max_in_flight)

    @app.exception_handler(StoreError)
    async def store_error(request: Request, e: StoreError):
        return JSONResponse(error_body(str(e)), status_code=404 if isinstance(e, NotFound) else 400)

    @app.exception_handler(ValueError)
    async def refused_by_the_model(request: Request, e: ValueError):
        """The model's checks (a question longer than its positions, bad token ids, ...): bad input."""
        return JSONResponse(error_body(str(e)), status_code=400)

    async def run(job) -> Any:
        return await asyncio.wrap_future(worker.submit(job))

    def check_text(text: str) -> None:
        if not text.strip():
            raise HTTPException(400, "the text is empty")
        if len(text) > limits.max_text_chars:
            raise HTTPException(413, f"text of {len(text)} characters: at most {limits.max_text_chars}")

    def max_new(requested: int | None) -> int:
        n = requested or min(64, limits.max_tokens)
        if n > limits.max_tokens:
            raise HTTPException(400, f"max_tokens={n}: at most {limits.max_tokens}")
        return n

    # ---- OpenAI-compatible ---------------------------------------------------------------------

    @app.get("/v1/models")
    def list_models(key: Caller) -> dict:
        items = [{"id": model_name, "object": "model", "created": 0, "owned_by": "memllm"}]
        items += [{"id": f"{model_name}/{r.id}", "object": "model", "created": int(r.created), "owned_by": key.tenant}
                  for r in store.list(key.tenant)]
        return {"object": "list", "data": items}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, key: Caller):
        memory_id = memory_of(body.model, body.memory)
        question = next((m.content for m in reversed(body.messages) if m.role == "user"), None)
        if question is None:
            raise HTTPException(400, "no user message to answer")
        check_text(question)
        n = max_new(body.max_completion_tokens or body.max_tokens)
        if body.stream:  # once a stream has begun its status is sent: refuse an unknown memory first
            store.get(key.tenant, memory_id)
            return _sse(worker, Stream(key.tenant, memory_id, question, n, emit=lambda _: None), body.model, chat=True)
        answer = await run(Ask(key.tenant, memory_id, question, n))
        if body.write_to_memory:
            await run(Inject(key.tenant, memory_id, [f"{question}\n{answer}"], key.id))
        return _completion(body.model, answer, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, key: Caller):
        memory_id = memory_of(body.model, body.memory)
        check_text(body.prompt)
        n = max_new(body.max_tokens)
        if body.stream:  # as for chat: refuse an unknown memory before the stream begins
            store.get(key.tenant, memory_id)
            return _sse(worker, Stream(key.tenant, memory_id, body.prompt, n, emit=lambda _: None, chat=False),
                        body.model, chat=False)
        answer = await run(Ask(key.tenant, memory_id, body.prompt, n, chat=False))
        return _completion(body.model, answer, chat=False)

    # ---- memories ------------------------------------------------------------------------------

    @app.post("/v1/memories", status_code=201)
    def create_memory(body: CreateMemory, key: Caller) -> dict:
        return _record(store.create(key.tenant, model.new_memory(), name=body.name))

    @app.get("/v1/memories")
    def list_memories(key: Caller) -> dict:
        return {"object": "list", "data": [_record(r) for r in store.list(key.tenant)]}

    @app.get("/v1/memories/{memory_id}")
    def get_memory(memory_id: str, key: Caller) -> dict:
        record = store.get(key.tenant, memory_id)
        memory = worker.cache.get(memory_id, record.version)  # a hot memory's info costs no read
        if memory is None:
            memory, _ = store.load(key.tenant, memory_id, record.version)
        return {**_record(record), "info": memory.info()}

    @app.post("/v1/memories/{memory_id}/inject")
    async def inject(memory_id: str, body: InjectRequest, key: Caller) -> dict:
        texts = ([body.text] if body.text is not None else []) + list(body.texts or [])
        if not texts:
            raise HTTPException(400, "give `text` or `texts`")
        if len(texts) > limits.max_batch_texts:
            raise HTTPException(413, f"{len(texts)} texts: at most {limits.max_batch_texts} per request")
        for text in texts:
            check_text(text)
        try:
            version, ids = await run(Inject(key.tenant, memory_id, texts, key.id))
        except VersionConflict as e:  # other writers kept winning for WRITE_PATIENCE_S: retry later
            raise HTTPException(409, str(e)) from e
        except StoreError:
            raise
        except ValueError as e:  # the model refused the text
            raise HTTPException(400, str(e)) from e
        return {"memory": memory_id, "version": version, "updates": ids}

    @app.post("/v1/memories/{memory_id}/fork", status_code=201)
    def fork(memory_id: str, body: ForkRequest, key: Caller) -> dict:
        return _record(store.fork(key.tenant, memory_id, body.name))

    @app.get("/v1/memories/{memory_id}/history")
    def history(memory_id: str, key: Caller) -> dict:
        return {"object": "list", "data": store.history(key.tenant, memory_id)}

    @app.get("/v1/memories/{memory_id}/versions")
    def list_versions(memory_id: str, key: Caller) -> dict:
        return {"object": "list", "data": store.versions(key.tenant, memory_id)}

    @app.post("/v1/memories/{memory_id}/versions/{version}/restore")
    def restore(memory_id: str, version: int, key: Caller) -> dict:
        store.restore(key.tenant, memory_id, version)
        return _record(store.get(key.tenant, memory_id))

    @app.get("/v1/memories/{memory_id}/export")
    def export(memory_id: str, key: Caller, version: int | None = None) -> Response:
        data = store.export(key.tenant, memory_id, version)
        return Response(data, media_type="application/octet-stream",
                        headers={"content-disposition": f'attachment; filename="{memory_id}.mem"'})

    @app.post("/v1/memories/import", status_code=201)
    async def import_memory(file: UploadFile, key: Caller, name: str = "") -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "upload.mem"
            path.write_bytes(await file.read())
            try:
                memory = Memory.load(path)
                model.check_memory(memory)
            except (MemoryFileError, MemoryMismatchError) as e:
                raise HTTPException(400, f"not a memory of this model: {e}") from e
        return _record(store.create(key.tenant, memory, name=name[:200]))

    @app.delete("/v1/memories/{memory_id}")
    def delete(memory_id: str, key: Caller) -> dict:
        store.delete(key.tenant, memory_id)
        worker.cache.drop(memory_id)
        return {"id": memory_id, "deleted": True}

    return app


# ---- response shapes ------------------------------------------------------------------------------


def error_body(message: str) -> dict:
    """An error as OpenAI's clients read it (`error.message`) and FastAPI's do (`detail`)."""
    return {"error": {"message": message, "type": "invalid_request_error"}, "detail": message}


def _record(r: MemoryRecord) -> dict:
    return {"id": r.id, "object": "memory", "name": r.name, "version": r.version, "updates": r.updates,
            "created": int(r.created), "fingerprint": r.fingerprint}


def _completion(model: str, text: str, chat: bool) -> dict:
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice.update(text=text, logprobs=None)
    return {"id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12),
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": None}


def _sse(worker: Worker, job: Stream, model: str, chat: bool) -> StreamingResponse:
    """Server-sent events as OpenAI streams them: one chunk per piece, a final chunk, then [DONE]."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()
    job.emit = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
    future = worker.submit(job)
    ident, created = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12), int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(piece: str | None, finish: str | None = None, role: bool = False) -> str:
        if chat:
            delta: dict[str, str] = {"role": "assistant"} if role else {}
            if piece:
                delta["content"] = piece
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
        return "data: " + json.dumps({"id": ident, "object": kind, "created": created, "model": model,
                                      "choices": [choice]}) + "\n\n"

    async def events():
        if chat:
            yield chunk(None, role=True)
        while (piece := await pieces.get()) is not None:
            if piece:
                yield chunk(piece)
        try:
            await asyncio.wrap_future(future)
        except Exception as e:  # the stream has begun: the error travels as an event
            yield "data: " + json.dumps(error_body(str(e))) + "\n\n"
        else:
            yield chunk(None, finish="stop")
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
