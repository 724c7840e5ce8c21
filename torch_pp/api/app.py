"""The OpenAI-compatible HTTP API on rank 0 (FastAPI, served by uvicorn).

Endpoints in OpenAI's shapes: ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions`` (each streaming as server-sent events ending ``data: [DONE]``), and
``GET /health`` (every stage: rank, host, layers, alive or lost; requests running and waiting; each
running batch's rows; with ``?stages=1`` the KV caches every other stage holds). Errors use OpenAI's error
JSON: 400 bad parameters (the CLI's ranges), 401 a missing or wrong key, 404 an unknown
model, 429 every slot and queue place taken, 503 a lost stage (named).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from typing import Any, Callable

from fastapi import FastAPI, Query, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from ..errors import OptionsError
from .engine import Busy, Engine, Generation, Lost, Request

DEFAULT_MAX_TOKENS = 512  # when a request names none


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we ignore (user, logprobs=False, ...)
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    stream_options: dict | None = None


class ChatBody(_Body):
    messages: list[dict[str, Any]]


class CompletionBody(_Body):
    prompt: str


def _error(status: int, message: str, kind: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def build_app(engine: Engine, *, model_name: str, stages: list[dict], api_key: str | None = None,
              lost_rank: Callable[[str | None], int | None] | None = None,
              stage_figures: Callable[[], list[dict]] | None = None) -> FastAPI:
    """The FastAPI application.

    Args:
        engine: Runs the requests.
        model_name: The one model this server serves (requests naming another get 404).
        stages: Every stage's ``{"rank", "host", "layers"}``, for ``/health``.
        api_key: When set, every ``/v1`` request must carry ``Authorization: Bearer <key>``.
        lost_rank: Maps the liveness verdict to the lost stage's rank (``Monitor.lost_rank``).
        stage_figures: Every stage's figures (``Pipeline.stats``), for ``/health?stages=1``: the KV
            caches each holds (``kv_lanes``) and all of each stage's figures (``stage_figures``), asked
            round the ring.
    """
    app = FastAPI(title="torch_pp", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.middleware("http")
    async def authorize(request: HTTPRequest, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error",
                              "invalid_api_key")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: HTTPRequest, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(400, f"invalid request: {where or 'body'}: {first.get('msg', 'malformed')}", "invalid_request_error",
                      param=where)

    @app.get("/health")
    async def health(of_stages: int = Query(0, alias="stages")):
        verdict = engine.lost()
        lost = lost_rank(verdict) if (verdict and lost_rank) else None
        rows = [{**s, "alive": s["rank"] != lost} for s in stages]
        body = {"status": "ok" if not verdict else "lost", "error": verdict, "stages": rows,
                "requests": {"running": engine.running, "waiting": engine.waiting}}
        if engine.batches is not None:  # each running batch's rows, prefilling and queued requests, steps
            body["batches"] = engine.batches.figures()
        if of_stages and stage_figures is not None and not verdict:  # a round of the ring: off the event loop
            figures = await asyncio.to_thread(stage_figures)
            body["kv_lanes"] = [s.get("kv_lanes", 0) for s in figures[1:]]
            body["stage_figures"] = figures  # how each stage's decode steps ran (captured, slotted, eager)
        return JSONResponse(body, status_code=503 if verdict else 200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "torch_pp"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: HTTPRequest):
        try:
            ids = engine.tokenizer.apply_chat_template(body.messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True)["input_ids"]
        except Exception as exc:  # noqa: BLE001 - the template rejects these messages
            return _error(400, f"invalid messages: {exc}", "invalid_request_error", param="messages")
        return await _complete(body, ids, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: HTTPRequest):
        return await _complete(body, engine.tokenizer(body.prompt)["input_ids"], request, chat=False)

    async def _complete(body: _Body, ids: list[int], request: HTTPRequest, *, chat: bool):
        if body.model != model_name:
            return _error(404, f"the model {body.model!r} does not exist: this server serves {model_name!r}",
                          "invalid_request_error", "model_not_found", "model")
        if body.n != 1:
            return _error(400, "n must be 1: one completion per request", "invalid_request_error", param="n")
        try:
            req = Request.checked(ids, max_tokens=body.max_completion_tokens or body.max_tokens,
                                  default_max_tokens=DEFAULT_MAX_TOKENS, temperature=body.temperature, top_p=body.top_p,
                                  seed=body.seed, stop=body.stop)
        except OptionsError as exc:
            return _error(400, str(exc), "invalid_request_error")
        generation = Generation(req)
        pieces = engine.stream(generation)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        try:  # the first piece (or the refusal) before answering: a 429 or 503 must not be a 200 stream
            first = await anext(pieces, None)
        except Busy as exc:
            return _error(429, str(exc), "rate_limit_error", "busy")
        except Lost as exc:
            return _error(503, f"the pipeline has lost a stage: {exc}", "server_error", "stage_lost")
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_events(ident, first, pieces, generation, chat, usage), media_type="text/event-stream")
        text = first or ""
        try:
            async for piece in pieces:
                text += piece
        except Lost as exc:
            return _error(503, f"the pipeline has lost a stage: {exc}", "server_error", "stage_lost")
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text})
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name, "choices": [{**choice, "finish_reason": generation.finish_reason, "logprobs": None}],
                "usage": _usage(generation)}

    async def _events(ident: str, first: str | None, pieces, generation: Generation, chat: bool, usage: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(delta: str | None, finish: str | None = None, role: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
                choice = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish}
            chunk = {"id": ident, "object": kind, "created": int(time.time()), "model": model_name, "choices": [choice]}
            return f"data: {json.dumps(chunk)}\n\n"

        try:
            if chat:
                yield event(None, role=True)
            if first:
                yield event(first)
            async for piece in pieces:
                yield event(piece)
            yield event(None, generation.finish_reason)
            if usage:
                chunk = {"id": ident, "object": kind, "created": int(time.time()), "model": model_name, "choices": [],
                         "usage": _usage(generation)}
                yield f"data: {json.dumps(chunk)}\n\n"
        except Lost as exc:
            error = {"error": {"message": f"the pipeline has lost a stage: {exc}", "type": "server_error", "code": "stage_lost"}}
            yield f"data: {json.dumps(error)}\n\n"
        finally:
            await pieces.aclose()  # a client gone: cancel the request (it stops at its next step)
        yield "data: [DONE]\n\n"

    return app


def _usage(generation: Generation) -> dict:
    return {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens}
