"""Handlers of the inference endpoints: ``/api/chat``, ``/api/generate``, ``/api/embed``
and ``/api/embeddings``.

Order of checks, following ``server/routes.go``: body and field types (including
``keep_alive``) -> model name -> (embed) input type -> model installed ->
capability -> injected hang/fail faults -> unload short-cut -> option types ->
scheduling (queue, load) -> load short-cut reply -> a runner slot -> output.
``/api/embed`` on a completion model is allowed, as in Ollama (it asks for no
capability).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from aiohttp import web

from .catalog import Installed
from .faults import Drop, Fail
from .generation import count_tokens, embedding, reply_tokens, token_ids
from .generation import normalise as normalise_vector
from .keepalive import KeepAliveError, parse_keep_alive
from .names import is_cloud
from .names import normalise as normalise_name
from .residency import QueueFull, Runner, RunnerGone, RunnerOptions
from .settings import StubModel
from .state import STUB, Stub, StubRequest
from .wire import (
    NDJSON_TYPE,
    RequestError,
    error_response,
    is_go_int,
    json_response,
    ndjson_line,
    now_ns,
    read_json_object,
    send,
    type_error,
    utc_now,
)

Endpoint = Literal["chat", "generate", "embed", "embeddings"]


class Writer(Protocol):
    """How one request's answers go on the wire.

    The native API writes Ollama's objects as they are; Ollama's OpenAI
    middleware wraps the same handlers and rewrites each object on its way out
    (see :mod:`stub_ollama.openai_compat`).
    """

    stream_type: str

    def reply(self, obj: dict[str, Any]) -> web.Response:
        """A whole answer (``stream: false``, or a load short-cut)."""
        ...

    def line(self, obj: dict[str, Any]) -> bytes:
        """One object of a streamed answer, framed."""
        ...


class Dialect(Protocol):
    """An API served by the inference handlers: its request binding and its error shape."""

    async def read(self, request: web.Request, go_type: str) -> dict[str, Any]:
        """The request body as a JSON object; raises RequestError."""
        ...

    def bind(self, body: dict[str, Any]) -> tuple[dict[str, Any], Writer]:
        """The native request for ``body`` and the writer of its answers; raises RequestError."""
        ...

    def error(self, err: RequestError) -> web.Response:
        """An error answered before any output."""
        ...


class _NativeWriter:
    stream_type = NDJSON_TYPE

    def reply(self, obj: dict[str, Any]) -> web.Response:
        return json_response(obj)

    def line(self, obj: dict[str, Any]) -> bytes:
        return ndjson_line(obj)


class _Native:
    writer = _NativeWriter()

    async def read(self, request: web.Request, go_type: str) -> dict[str, Any]:
        return await read_json_object(request, go_type)

    def bind(self, body: dict[str, Any]) -> tuple[dict[str, Any], Writer]:
        return body, self.writer

    def error(self, err: RequestError) -> web.Response:
        return error_response(err.status, err.message)


NATIVE: Dialect = _Native()

# ------------------------------------------------------------------ validation


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_int_list(value: object) -> bool:
    return isinstance(value, list) and all(is_go_int(v) for v in value)


_CHECKS: dict[str, Callable[[object], bool]] = {
    "string": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "int": is_go_int,
    "[]api.Message": lambda v: isinstance(v, list),
    "api.Tools": lambda v: isinstance(v, list),
    "map[string]interface {}": lambda v: isinstance(v, dict),
    "[]int": _is_int_list,
    "[]api.ImageData": _is_str_list,
}

_COMMON = {"model": "string", "options": "map[string]interface {}"}
_GENERATIVE = {
    **_COMMON,
    "stream": "bool",
    "truncate": "bool",
    "shift": "bool",
    "logprobs": "bool",
    "top_logprobs": "int",
}
_SCHEMAS: dict[Endpoint, tuple[str, dict[str, str]]] = {
    "chat": ("ChatRequest", {**_GENERATIVE, "messages": "[]api.Message", "tools": "api.Tools"}),
    "generate": (
        "GenerateRequest",
        {
            **_GENERATIVE,
            "prompt": "string",
            "suffix": "string",
            "system": "string",
            "template": "string",
            "context": "[]int",
            "raw": "bool",
            "images": "[]api.ImageData",
        },
    ),
    "embed": ("EmbedRequest", {**_COMMON, "truncate": "bool", "dimensions": "int"}),
    "embeddings": ("EmbeddingRequest", {**_COMMON, "prompt": "string"}),
}

_MESSAGE_FIELDS = {
    "role": "string",
    "content": "string",
    "thinking": "string",
    "images": "[]api.ImageData",
    "tool_name": "string",
    "tool_call_id": "string",
}

_THINK_LEVELS = {"high", "medium", "low", "max"}

# Runner options force a reload when they change; defaults as in api.DefaultOptions.
_RUNNER_DEFAULTS: dict[str, object] = {
    "num_batch": 512,
    "num_gpu": -1,
    "main_gpu": 0,
    "use_mmap": None,
    "num_thread": 0,
}


def _check_types(endpoint: Endpoint, body: dict[str, Any]) -> float | None:
    """Check field types in document order, as Go's decoder would; returns keep_alive."""
    struct, schema = _SCHEMAS[endpoint]
    keep_alive: float | None = None
    for key, value in body.items():
        if value is None:
            continue  # null leaves a Go field at its zero value
        if key == "keep_alive":
            try:
                keep_alive = parse_keep_alive(value)
            except KeepAliveError as exc:
                raise RequestError(400, str(exc)) from exc
            continue
        if key == "think" and endpoint in ("chat", "generate"):
            if isinstance(value, str) and value not in _THINK_LEVELS:
                raise RequestError(
                    400,
                    f'invalid think value: "{value}" (must be "high", "medium", "low", true, or false)',
                )
            if not isinstance(value, bool | str):
                raise RequestError(
                    400, 'think must be a boolean or string ("high", "medium", "low", true, or false)'
                )
            continue
        go_type = schema.get(key)
        if go_type is None:
            continue
        if not _CHECKS[go_type](value):
            raise type_error(struct, key, go_type, value)
        if key == "messages":
            for message in value:
                if not isinstance(message, dict):
                    raise type_error(struct, "messages", "api.Message", message)
                for mkey, mvalue in message.items():
                    mtype = _MESSAGE_FIELDS.get(mkey)
                    if mvalue is not None and mtype and not _CHECKS[mtype](mvalue):
                        raise type_error(struct, f"messages.{mkey}", mtype, mvalue)
    return keep_alive


def _int_option(options: dict[str, Any], key: str, default: int | None) -> int | None:
    value = options.get(key)
    if value is None:
        return default
    if not is_go_int(value):
        # Ollama's opts.FromMap error reaches the client through handleScheduleError: 500.
        raise RequestError(500, f'option "{key}" must be of type integer')
    return int(value)


def _runner_options(options: dict[str, Any], num_ctx: int) -> RunnerOptions:
    values: dict[str, object] = {"num_ctx": _int_option(options, "num_ctx", num_ctx)}
    for key, default in _RUNNER_DEFAULTS.items():
        if key == "use_mmap":
            value = options.get(key)
            if value is not None and not isinstance(value, bool):
                raise RequestError(500, f'option "{key}" must be of type boolean')
            values[key] = value
        else:
            values[key] = _int_option(options, key, default if isinstance(default, int) else None)
    return tuple(sorted(values.items()))


@dataclass(slots=True)
class Call:
    """A validated inference request."""

    endpoint: Endpoint
    body: dict[str, Any]
    model_sent: str
    model: Installed
    keep_alive: float | None
    options: dict[str, Any]
    stream: bool
    is_load: bool
    text: str  # what the reply is derived from
    inputs: list[str]  # /api/embed inputs
    writer: Writer
    cloud: bool = False  # a `:cloud`/`-cloud` name: Ollama's cloud answers, nothing loads here


def _load_request(endpoint: Endpoint, body: dict[str, Any]) -> bool:
    if endpoint == "chat":
        return not body.get("messages")
    if endpoint == "embed":
        value = body.get("input")
        return value is None or value == "" or value == []
    return not body.get("prompt")


def _prompt_text(endpoint: Endpoint, body: dict[str, Any]) -> str:
    if endpoint == "chat":
        messages = body.get("messages") or []
        return str(messages[-1].get("content") or "") if messages else ""
    return str(body.get("prompt") or "")


def _embed_inputs(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise RequestError(400, "invalid input type")


async def _parse(
    request: web.Request, endpoint: Endpoint, stub: Stub, record: StubRequest, dialect: Dialect
) -> Call:
    struct = _SCHEMAS[endpoint][0]
    sent = await dialect.read(request, f"api.{struct}")
    model_value = sent.get("model")
    record.body, record.model = sent, model_value if isinstance(model_value, str) else None
    body, writer = dialect.bind(sent)
    record.is_load = _load_request(endpoint, body)
    stub.changed()
    keep_alive = _check_types(endpoint, body)
    model_sent = model_value if isinstance(model_value, str) else ""
    if normalise_name(model_sent) is None:
        raise RequestError(400, "model is required" if endpoint == "chat" else "invalid model name")
    inputs = _embed_inputs(body.get("input")) if endpoint == "embed" else []
    installed = stub.find(model_sent)
    cloud = installed is None and is_cloud(model_sent)
    if cloud:
        installed = Installed(model_sent, StubModel(model_sent), datetime.now().astimezone())
        record.cloud = True
    if installed is None:
        if endpoint == "embeddings":  # handleScheduleError, with Go's %q
            raise RequestError(404, f'model "{model_sent}" not found, try pulling it first')
        raise RequestError(404, f"model '{model_sent}' not found")  # the handler's own check
    stream_value = body.get("stream")
    return Call(
        endpoint=endpoint,
        body=body,
        model_sent=model_sent,
        model=installed,
        keep_alive=keep_alive,
        options=body.get("options") or {},
        stream=stream_value is not False and endpoint in ("chat", "generate"),
        is_load=record.is_load,
        text=_prompt_text(endpoint, body),
        inputs=inputs,
        writer=writer,
        cloud=cloud,
    )


# ------------------------------------------------------------------- replies


def _metrics(t_start: int, t_loaded: int, prompt_count: int, eval_count: int, eval_ns: int) -> dict[str, int]:
    metrics = {
        "total_duration": max(now_ns() - t_start, 1),
        "load_duration": max(t_loaded - t_start, 1),
        "prompt_eval_count": prompt_count,
        "prompt_eval_duration": prompt_count * 20_000,
        "eval_count": eval_count,
        "eval_duration": eval_ns,
    }
    # Ollama's metric fields are omitempty.
    return {k: v for k, v in metrics.items() if v}


def _chunk(call: Call, content: str, done: bool) -> dict[str, Any]:
    chunk: dict[str, Any] = {"model": call.model_sent, "created_at": utc_now()}
    if call.endpoint == "chat":
        chunk["message"] = {"role": "assistant", "content": content}
    else:
        chunk["response"] = content
    chunk["done"] = done
    return chunk


def _short_cut_reply(call: Call, reason: str) -> dict[str, Any]:
    reply = _chunk(call, "", True)
    reply["done_reason"] = reason
    return reply


class _Dropped(Exception):
    """The injected drop fault aborted the connection."""


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _generate(
    request: web.Request,
    stub: Stub,
    call: Call,
    record: StubRequest,
    t_start: int,
    t_loaded: int,
    fail: Fail | None,
) -> web.StreamResponse:
    settings = stub.settings
    count = settings.tokens
    done_reason = "stop"
    # num_predict caps the reply; -1/-2 (unlimited, fill context) and 0 leave it alone.
    num_predict = _int_option(call.options, "num_predict", None)
    if num_predict is not None and 0 < num_predict < count:
        count, done_reason = num_predict, "length"
    tokens = reply_tokens(call.model.name, call.text, count)
    prompt_count = count_tokens(call.text) or 1
    drop = stub.faults.take_drop(False, call.stream)
    t_eval = now_ns()

    def final(content: str) -> dict[str, Any]:
        chunk = _chunk(call, content, True)
        chunk["done_reason"] = done_reason
        if call.endpoint == "generate" and not call.body.get("raw"):
            chunk["context"] = token_ids(call.text + " " + "".join(tokens))
        chunk.update(_metrics(t_start, t_loaded, prompt_count, len(tokens), now_ns() - t_eval))
        return chunk

    if not call.stream:
        if drop is not None:
            _abort(request)
            raise _Dropped
        for i in range(len(tokens)):
            if i and settings.token_delay > 0:
                await asyncio.sleep(settings.token_delay)
        reply = final("".join(tokens))
        record.outcome = "ok"
        return await send(request, call.writer.reply(reply))

    total_chunks = len(tokens) + 1
    limit: int | None = None
    if drop is not None:
        limit = min(drop.after_chunks, total_chunks)
    elif fail is not None and fail.after_chunks is not None:
        limit = min(fail.after_chunks, len(tokens))
    if limit == 0:
        if drop is not None:
            _abort(request)
            raise _Dropped
        assert fail is not None
        record.outcome = "failed"
        raise RequestError(fail.status, fail.error)

    stall = stub.faults.take_stall(False, True)
    response = web.StreamResponse(status=200, headers={"Content-Type": call.writer.stream_type})
    for index in range(total_chunks):
        if limit is not None and index == limit:
            break
        if stall is not None and index == stall[0]:
            if not response.prepared:
                await response.prepare(request)
                record.status = 200
            await stub.faults.hang(stall[1])
        if 0 < index < len(tokens) and settings.token_delay > 0:
            await asyncio.sleep(settings.token_delay)
        if not response.prepared:
            await response.prepare(request)
            record.status = 200
        # Built just before sending so created_at and the metrics are current.
        piece = _chunk(call, tokens[index], False) if index < len(tokens) else final("")
        await response.write(call.writer.line(piece))
        record.chunks_sent += 1
        stub.changed()
    if drop is not None:
        _abort(request)
        raise _Dropped
    if fail is not None and limit is not None:
        # Mid-stream failure: one error line, no done line, status already 200.
        await response.write(call.writer.line({"error": fail.error}))
        record.outcome = "failed"
        record.error = fail.error
    else:
        record.outcome = "ok"
    await response.write_eof()
    return response


async def _embed(
    request: web.Request, stub: Stub, call: Call, record: StubRequest, t_start: int, t_loaded: int
) -> web.StreamResponse:
    settings = stub.settings
    dims = settings.embedding_dims
    texts = [call.text] if call.endpoint == "embeddings" else call.inputs
    # The call takes what it costs on Ollama's GPU; the stub's own work counts towards it.
    done_at = asyncio.get_running_loop().time() + (
        settings.embed_call_delay + settings.embed_input_delay * len(texts)
    )
    # Vectors come from the weights, so from the model's digest: a re-pulled
    # model gives other vectors for the same text, as a new version would.
    digest = call.model.digest
    if call.endpoint == "embeddings":
        vector = embedding(digest, call.text, dims)
        await _until(done_at)
        record.outcome = "ok"
        return await send(request, call.writer.reply({"embedding": vector}))
    num_ctx = _int_option(call.options, "num_ctx", settings.num_ctx) or settings.num_ctx
    if call.body.get("truncate") is False and any(count_tokens(t) > num_ctx for t in texts):
        record.outcome = "error"
        raise RequestError(400, "the input length exceeds the context length")
    wanted = call.body.get("dimensions")
    cut = int(wanted) if is_go_int(wanted) else 0
    vectors = []
    for text in texts:
        vector = embedding(digest, text, dims)
        if 0 < cut < len(vector):
            # Ollama truncates to `dimensions` and normalises again.
            vector = normalise_vector(vector[:cut])
        vectors.append(vector)
    await _until(done_at)
    reply = {
        "model": call.model_sent,
        "embeddings": vectors,
        "total_duration": max(now_ns() - t_start, 1),
        "load_duration": max(t_loaded - t_start, 1),
        "prompt_eval_count": sum(count_tokens(t) for t in texts),
    }
    record.outcome = "ok"
    return await send(request, call.writer.reply({k: v for k, v in reply.items() if v != 0}))


async def _until(when: float) -> None:
    delay = when - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _run(
    request: web.Request, stub: Stub, call: Call, record: StubRequest, t_start: int
) -> web.StreamResponse:
    faults = stub.faults
    unloading = call.is_load and call.keep_alive == 0
    if call.model.kind == "embedding" and call.endpoint in ("chat", "generate") and not unloading:
        raise RequestError(400, f'"{call.model_sent}" does not support {call.endpoint}')
    release = faults.take_hang(call.is_load)
    if release is not None:
        await faults.hang(release)
    # A broken model still unloads: that is how a client makes room.
    fail = faults.take_fail(call.is_load, None if unloading else call.model.name)
    mid_stream = call.stream and not call.is_load
    if fail is not None and not (mid_stream and fail.after_chunks):
        record.outcome = "failed"
        raise RequestError(fail.status, fail.error)

    if call.is_load and call.keep_alive == 0 and call.endpoint in ("chat", "generate"):
        # Unload short-cut: expire the runner and answer at once (expireRunner).
        stub.scheduler.expire(call.model.name)
        record.outcome = "unload"
        return await send(request, call.writer.reply(_short_cut_reply(call, "unload")))

    if call.cloud:
        # Forwarded to Ollama's cloud: no runner, no slot, no wait behind local work.
        t_loaded = now_ns()
        if call.is_load and call.endpoint in ("chat", "generate"):
            record.outcome = "load"
            return await send(request, call.writer.reply(_short_cut_reply(call, "load")))
        if call.endpoint in ("chat", "generate"):
            return await _generate(request, stub, call, record, t_start, t_loaded, fail)
        return await _embed(request, stub, call, record, t_start, t_loaded)
    options = _runner_options(call.options, stub.settings.num_ctx)
    _int_option(call.options, "num_predict", None)  # Ollama rejects bad options before loading
    try:
        runner = await stub.scheduler.acquire(call.model.name, options, call.keep_alive)
    except QueueFull as exc:
        raise RequestError(503, str(exc)) from exc
    except RunnerGone as exc:
        raise RequestError(500, str(exc)) from exc
    try:
        t_loaded = now_ns()
        if call.is_load:
            if call.endpoint in ("chat", "generate"):
                record.outcome = "load"
                return await send(request, call.writer.reply(_short_cut_reply(call, "load")))
            record.outcome = "load"
            empty: dict[str, Any] = (
                {"model": call.model_sent, "embeddings": []}
                if call.endpoint == "embed"
                else {"embedding": []}
            )
            return await send(request, call.writer.reply(empty))
        return await _with_slot(request, stub, runner, call, record, t_start, t_loaded, fail)
    finally:
        stub.scheduler.release(runner)


async def _with_slot(
    request: web.Request,
    stub: Stub,
    runner: Runner,
    call: Call,
    record: StubRequest,
    t_start: int,
    t_loaded: int,
    fail: Fail | None,
) -> web.StreamResponse:
    await runner.slots.acquire()
    stub.start_generating()
    try:
        if call.endpoint in ("chat", "generate"):
            return await _generate(request, stub, call, record, t_start, t_loaded, fail)
        drop: Drop | None = stub.faults.take_drop(False, False)
        if drop is not None:
            _abort(request)
            raise _Dropped
        return await _embed(request, stub, call, record, t_start, t_loaded)
    finally:
        runner.slots.release()
        stub.stop_generating()


async def serve_inference(
    request: web.Request, endpoint: Endpoint, dialect: Dialect = NATIVE
) -> web.StreamResponse:
    """Serve one inference request, keeping the stub's records and counters right."""
    stub = request.app[STUB]
    t_start = now_ns()
    record = stub.arrive(request.path)
    response: web.StreamResponse
    try:
        call = await _parse(request, endpoint, stub, record, dialect)
        response = await _run(request, stub, call, record, t_start)
        if record.status is None:
            record.status = response.status
    except RequestError as err:
        if record.outcome == "pending":
            record.outcome = "error"
        record.error = err.message
        record.status = err.status
        response = dialect.error(err)
        try:
            await send(request, response)
        except ConnectionError:
            record.disconnected = True
    except _Dropped:
        record.outcome = "dropped"
        # aiohttp's attempt to finish this reply fails quietly on the aborted transport.
        response = web.Response(status=500)
    except ConnectionError:
        # The client went away while we were writing.
        _mark_disconnected(record)
        response = web.Response(status=499)
    except asyncio.CancelledError:
        # aiohttp cancels the handler when the client disconnects.
        _mark_disconnected(record)
        raise
    finally:
        stub.depart(record)
    return response


def _mark_disconnected(record: StubRequest) -> None:
    record.disconnected = True
    if record.outcome in ("pending", "ok"):
        record.outcome = "disconnected"
