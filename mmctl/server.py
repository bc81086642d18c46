"""The OpenAI-compatible HTTP API of `mmctl serve`: FastAPI routes in front of one decoding thread.

    POST /v1/chat/completions   a conversation through the model's chat template (streamed as server-sent events
                                with "stream": true); an image as an `image_url` content part with a data: URL
    POST /v1/completions        a plain continuation of a prompt (a string or token ids, or a list of them)
    GET  /v1/models             the one model served
    GET  /health                200 once the model is loaded

Requests wait in one bounded queue; the decoding thread (mmctl/batcher.py) takes up to `batch_size` of them that
decode alike and decodes them as one left-padded batch, so N clients cost about one client's time per token, not
N times it. A full queue answers 503 with Retry-After, a body
over the size limit 413, and every other bad request one JSON error in OpenAI's shape — never a dropped
connection, never a dead server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import itertools
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from mmctl.batcher import Batcher, Pending, QueueFull
from mmctl.errors import MmctlError
from mmctl.generate import SamplingConfig


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers

    def body(self) -> dict:
        kind = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
                503: "server_overloaded"}.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# --- the requests, as OpenAI's API defines them (unknown fields are ignored, as OpenAI's servers do) ---

class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: Any = None

    def unsupported(self) -> str | None:
        if self.frequency_penalty or self.presence_penalty:
            return "frequency_penalty and presence_penalty are not supported (repetition is not penalised here)"
        if self.logprobs:
            return "logprobs are not supported"
        return None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] | None = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None


# --- the routes ---

def make_app(session, name: str, batcher: Batcher, max_tokens: int = 256, max_request_bytes: int = 4 << 20):
    """The FastAPI app serving `session` as model `name`; `max_tokens`: the completion's length when a request
    gives none (and at most)."""
    created = int(time.time())
    seeds = itertools.count(int(time.time()))  # a request without a seed samples anew each time

    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="mmctl serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # unknown routes and methods, in the same shape
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model(name, created)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != name:
            raise ApiError(404, f"the model {model_id!r} does not exist; this server serves {name!r}",
                           code="model_not_found", param="model")
        return _model(name, created)

    async def read(request: Request, kind: type[_Request]):
        """The request body, checked: its size, its JSON, its fields, its model."""
        import json

        length = request.headers.get("content-length")
        over = bool(length and length.isdigit() and int(length) > max_request_bytes)
        body, seen = bytearray(), 0
        async for chunk in request.stream():
            # an oversized body is read on and dropped (up to a bound), so the client, still sending, gets the 413
            # rather than a reset connection; memory holds at most the limit
            seen += len(chunk)
            over = over or seen > max_request_bytes
            if over and seen > 16 * max_request_bytes:
                break
            if not over:
                body += chunk
        if over:
            raise _too_large(max_request_bytes)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        try:
            req = kind.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise ApiError(400, f"{where}: {first['msg']}", param=where) from None
        if req.model != name:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {name!r}",
                           code="model_not_found", param="model")
        if problem := req.unsupported():
            raise ApiError(400, problem)
        return req

    def sampling(req: _Request, prompt: list[int], limit: int | None, index: int) -> SamplingConfig:
        room = session.context - len(prompt)
        if limit is not None and limit > max_tokens:
            raise ApiError(400, f"max_tokens {limit} is more than this server's limit of {max_tokens}",
                           param="max_tokens")
        if limit is not None and limit > room or room < 1:
            raise ApiError(400, f"this model's context is {session.context} tokens; the request asks for "
                                f"{len(prompt) + (limit or 1)} ({len(prompt)} in the prompt, {limit or 1} to "
                                "generate)", code="context_length_exceeded", param="messages")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        seed = req.seed if req.seed is not None else next(seeds)
        return SamplingConfig(max_new_tokens=limit or min(max_tokens, room), temperature=req.temperature,
                              top_p=req.top_p, stop_strings=[s for s in stops if s], seed=seed + index)

    def submit(prompts: list[list[int]], req: _Request, limit: int | None, pixels=None):
        """Queue every choice (n per prompt): (the queue their text arrives on, the choices)."""
        loop, out = asyncio.get_running_loop(), asyncio.Queue()
        choices = [Pending(ids, sampling(req, ids, limit, i), i, out, loop, pixels)
                   for i, ids in enumerate(p for p in prompts for _ in range(req.n))]
        try:
            batcher.submit(choices)
        except QueueFull as e:
            raise ApiError(503, f"the server is busy ({e.waiting} requests waiting); retry shortly", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        return out, choices

    async def replies(out: asyncio.Queue, n: int):
        """(index, text piece or Reply) as they come, until every choice is done."""
        done = 0
        while done < n:
            index, item = await out.get()
            if isinstance(item, MmctlError):
                raise ApiError(400, item.problems[0])
            if isinstance(item, Exception):
                raise ApiError(500, f"decoding failed: {type(item).__name__}: {item}")
            done += not isinstance(item, str)
            yield index, item

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read(request, ChatRequest)
        if not session.chat:
            raise ApiError(400, f"{name} has no chat template: ask /v1/completions for a plain continuation")
        messages, pixels = _conversation(req.messages, session)
        try:
            ids = session.prompt(messages)
        except MmctlError as e:
            raise ApiError(400, e.problems[0]) from None
        out, choices = submit([ids], req, req.max_completion_tokens or req.max_tokens, pixels)
        answer = Answer("chatcmpl", name, len(choices), len(ids))
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(answer.stream(replies(out, len(choices)), chat=True, usage=usage),
                                     media_type="text/event-stream")
        return await answer.whole(replies(out, len(choices)), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read(request, CompletionRequest)
        if req.echo or req.suffix:
            raise ApiError(400, "echo and suffix are not supported")
        prompts = _prompts(req.prompt, session)
        out, choices = submit(prompts, req, req.max_tokens)
        answer = Answer("cmpl", name, len(choices), sum(len(p) for p in prompts))
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(answer.stream(replies(out, len(choices)), chat=False, usage=usage),
                                     media_type="text/event-stream")
        return await answer.whole(replies(out, len(choices)), chat=False)

    return app


def _model(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "mmctl"}


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than this server's limit of {limit:,} bytes",
                    code="request_too_large")


def _conversation(messages: list[Message], session) -> tuple[list[dict], Any]:
    """The messages as the chat template takes them, and the image's pixels (one image, in a user message)."""
    out, pixels = [], None
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if m.content is None or isinstance(m.content, str):
            out.append({"role": role, "content": m.content or ""})
            continue
        texts, images = [], []
        for part in m.content:
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                images.append(part.get("image_url"))
            else:
                raise ApiError(400, f"messages.{i}.content: a part of type {kind!r} (text and image_url are "
                                    "understood)", param=f"messages.{i}.content")
        text = "\n".join(texts)
        if images and not session.vision:
            raise ApiError(400, f"{session.checkpoint} is a language model: it takes no images",
                           param=f"messages.{i}.content")
        if images and (len(images) > 1 or pixels is not None or role != "user"):
            raise ApiError(400, "one image per conversation, in a user message (the model sees one image)",
                           param=f"messages.{i}.content")
        if images:
            pixels = _pixels(images[0], session, f"messages.{i}")
        out.append(session.ask(text, image=True) if images else {"role": role, "content": text})
    return out, pixels


def _pixels(image_url, session, where: str):
    url = image_url.get("url") if isinstance(image_url, dict) else None
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise ApiError(400, f"{where}: the image must be a data: URL with base64 content (this server fetches "
                            "nothing)", param=where)
    try:
        data = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
        return session.image(io.BytesIO(data), f"{where} image")
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: the image's base64 does not decode", param=where) from None
    except MmctlError as e:
        raise ApiError(400, f"{where}: {e.problems[0]}", param=where) from None


def _prompts(prompt, session) -> list[list[int]]:
    """The prompts of a completion request as token ids (OpenAI's four shapes: a string, strings, ids, lists)."""
    if isinstance(prompt, str):
        prompts = [session.tok.encode(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [session.tok.encode(p) for p in prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    vocab = session.tok.vocab_size
    if not prompts or any(not p for p in prompts):
        raise ApiError(400, "prompt: empty (give at least one token of text)", param="prompt")
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
    return prompts


@dataclass
class Answer:
    """A response's choices in OpenAI's JSON, whole or as server-sent event chunks."""

    prefix: str
    model: str
    n: int
    prompt_tokens: int
    id: str = ""
    created: int = 0

    def __post_init__(self):
        self.id, self.created = f"{self.prefix}-{uuid.uuid4().hex[:24]}", int(time.time())

    def _envelope(self, chat: bool, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    async def whole(self, replies, chat: bool) -> dict:
        done = {}
        async for index, item in replies:
            if not isinstance(item, str):
                done[index] = item
        choices = []
        for i in range(self.n):
            r = done[i]
            choice = ({"message": {"role": "assistant", "content": r.text}} if chat else
                      {"text": r.text, "logprobs": None})
            choices.append({"index": i, **choice, "finish_reason": r.finish_reason})
        return {**self._envelope(chat, chunk=False), "choices": choices,
                "usage": self._usage(sum(r.tokens for r in done.values()))}

    async def stream(self, replies, chat: bool, usage: bool):
        import json

        def event(choices: list[dict], **extra) -> str:
            return "data: " + json.dumps({**self._envelope(chat, chunk=True), "choices": choices, **extra}) + "\n\n"

        def choice(index: int, text: str | None, finish: str | None, first: bool = False) -> dict:
            if not chat:
                return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta = {"role": "assistant", "content": text or ""} if first else {} if text is None else \
                {"content": text}
            return {"index": index, "delta": delta, "finish_reason": finish}

        if chat:
            yield event([choice(i, "", None, first=True) for i in range(self.n)])
        tokens = 0
        try:
            async for index, item in replies:
                if isinstance(item, str):
                    yield event([choice(index, item, None)])
                else:
                    tokens += item.tokens
                    yield event([choice(index, None, item.finish_reason)])
        except ApiError as e:  # the response has begun: the error is the stream's last event
            yield "data: " + json.dumps(e.body()) + "\n\n"
            return
        if usage:
            yield event([], usage=self._usage(tokens))
        yield "data: [DONE]\n\n"
