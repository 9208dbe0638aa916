"""Ollama's OpenAI-compatible endpoints: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``, ``/v1/models`` and ``/v1/models/{model}``.

Built the way Ollama builds them (``middleware/openai.go`` over ``openai/openai.go``):
the OpenAI request is bound and turned into a native one, the native handler
serves it (same scheduler, residency, faults and records), and a writer rewrites
every object the handler writes into OpenAI's shape. What follows from that:

* ``stream`` defaults to false; there is no ``keep_alive`` (a request leaves the
  runner's expiry as it was) and no ``options``.
* Streams are Server-Sent Events, ``data: {chunk}`` then ``data: [DONE]``; with
  ``stream_options.include_usage`` a last chunk with empty ``choices`` carries usage.
* Errors are ``{"error": {"message", "type", "param", "code"}}``. The middleware's
  own 400s have type ``invalid_request_error``; errors of the native handler keep
  their status, and ``writeError`` gives them the type of that status, as
  ``openai.NewError`` does (since Ollama 0.18: a 404 is ``not_found_error``).
* A mid-stream failure reaches the client as Ollama sends it: the native
  ``{"error": ...}`` line decodes as an empty response, so one chunk with an empty
  delta and an empty ``model``, and the stream ends without ``[DONE]``.
"""

from __future__ import annotations

import base64
import binascii
import random
import struct
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .inference import Writer, serve_inference
from .names import normalise
from .state import STUB
from .wire import RequestError, dumps, is_go_int, read_json_object, send, type_error

SSE_TYPE = "text/event-stream"
_JSON = "application/json"
_DONE = b"data: [DONE]\n\n"


class MiddlewareError(RequestError):
    """A request the OpenAI middleware refuses before any handler sees it."""


def _error_type(status: int) -> str:
    # openai.NewError
    return {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")


def error_response(status: int, message: str, error_type: str) -> web.Response:
    """OpenAI's error object, written like Go's json.Encoder (with a newline)."""
    body = {"error": {"message": message, "type": error_type, "param": None, "code": None}}
    return _json(body, status)


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=(dumps(obj) + "\n").encode(), headers={"Content-Type": _JSON})


def _event(obj: object) -> bytes:
    return f"data: {dumps(obj)}\n\n".encode()


# ------------------------------------------------------------------ binding


_TYPES: dict[str, Callable[[object], bool]] = {
    "string": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "int": is_go_int,
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}

# Go field types of openai.ChatCompletionRequest, CompletionRequest and EmbedRequest:
# (type checked, type named in the error).
_FIELDS: dict[str, dict[str, tuple[str, str]]] = {
    "ChatCompletionRequest": {
        "model": ("string", "string"),
        "messages": ("array", "[]openai.Message"),
        "stream": ("bool", "bool"),
        "stream_options": ("object", "openai.StreamOptions"),
        "max_tokens": ("int", "int"),
        "seed": ("int", "int"),
        "temperature": ("float", "float64"),
        "frequency_penalty": ("float", "float64"),
        "presence_penalty": ("float", "float64"),
        "top_p": ("float", "float64"),
        "response_format": ("object", "openai.ResponseFormat"),
        "tools": ("array", "[]api.Tool"),
        "reasoning_effort": ("string", "string"),
        "logprobs": ("bool", "bool"),
        "top_logprobs": ("int", "int"),
    },
    "CompletionRequest": {
        "model": ("string", "string"),
        "prompt": ("string", "string"),
        "frequency_penalty": ("float", "float32"),
        "max_tokens": ("int", "int"),
        "presence_penalty": ("float", "float32"),
        "seed": ("int", "int"),
        "stream": ("bool", "bool"),
        "stream_options": ("object", "openai.StreamOptions"),
        "temperature": ("float", "float32"),
        "top_p": ("float", "float32"),
        "suffix": ("string", "string"),
        "logprobs": ("int", "int"),
    },
    "EmbedRequest": {
        "model": ("string", "string"),
        "dimensions": ("int", "int"),
        "encoding_format": ("string", "string"),
    },
}
_MESSAGE_FIELDS = {"role": ("string", "string"), "name": ("string", "string")}


def _check(struct_name: str, body: dict[str, Any]) -> None:
    """Go's decoding of ``body`` into the OpenAI request struct: the first type error."""
    fields = _FIELDS[struct_name]
    for key, value in body.items():
        if value is None or key not in fields:
            continue
        kind, go_type = fields[key]
        if not _TYPES[kind](value):
            raise _bind_error(struct_name, key, go_type, value)
        if key == "messages":
            for message in value:
                if not isinstance(message, dict):
                    raise _bind_error(struct_name, key, "openai.Message", message)
                for mkey, (mkind, mtype) in _MESSAGE_FIELDS.items():
                    mvalue = message.get(mkey)
                    if mvalue is not None and not _TYPES[mkind](mvalue):
                        raise _bind_error(struct_name, f"messages.{mkey}", mtype, mvalue)
        if key == "stream_options" and not isinstance(value.get("include_usage", False), bool):
            raise _bind_error(struct_name, "stream_options.include_usage", "bool", value["include_usage"])


def _bind_error(struct_name: str, path: str, go_type: str, value: object) -> MiddlewareError:
    err = type_error(struct_name, path, go_type, value)
    return MiddlewareError(err.status, err.message)


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _stops(value: object, strict: bool) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if strict and not all(isinstance(s, str) for s in value):
            bad = next(s for s in value if not isinstance(s, str))
            raise MiddlewareError(400, f"invalid type for 'stop' field: {_go_type_name(bad)}")
        return [s for s in value if isinstance(s, str)]
    return None


def _go_type_name(value: object) -> str:
    """What Go's %T prints for a decoded JSON value."""
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "[]interface {}"
    return "map[string]interface {}"


def _sampling_options(body: dict[str, Any], strict_stop: bool) -> dict[str, Any]:
    options: dict[str, Any] = {}
    stops = _stops(body.get("stop"), strict_stop)
    if stops is not None:
        options["stop"] = stops
    if body.get("max_tokens") is not None:
        options["num_predict"] = int(body["max_tokens"])
    options["temperature"] = body["temperature"] if body.get("temperature") is not None else 1.0
    if body.get("seed") is not None:
        options["seed"] = int(body["seed"])
    for key in ("frequency_penalty", "presence_penalty"):
        if body.get(key) is not None:
            options[key] = body[key]
    options["top_p"] = body["top_p"] if body.get("top_p") else 1.0
    return options


def _image(url: object) -> str:
    if not isinstance(url, str):
        raise MiddlewareError(400, "invalid message format")
    if url.startswith(("http://", "https://")):
        raise MiddlewareError(
            400, "image URLs are not currently supported, please use base64 encoded data instead"
        )
    prefixes = ["data:;base64,", *(f"data:image/{t};base64," for t in ("jpeg", "jpg", "png", "webp"))]
    prefix = next((p for p in prefixes if url.startswith(p)), None)
    if prefix is None:
        raise MiddlewareError(400, "invalid image input")
    data = url[len(prefix) :]
    try:
        base64.b64decode(data, validate=True)
    except binascii.Error as exc:
        raise MiddlewareError(400, "invalid image input") from exc
    return data


def _messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """openai.FromChatRequest's messages (tool calls are not modelled by the stub)."""
    native: list[dict[str, Any]] = []
    for message in messages:
        role, content = message.get("role") or "", message.get("content")
        if isinstance(content, str):
            native.append({"role": role, "content": content})
        elif isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    native.append({"role": role, "content": part["text"]})
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    native.append({"role": role, "content": "", "images": [_image(url)]})
                else:
                    raise MiddlewareError(400, "invalid message format")
        elif message.get("tool_calls") is None:
            raise MiddlewareError(400, f"invalid message content type: {_go_type_name(content)}")
        else:
            native.append({"role": role, "content": ""})
    return native


def _think(body: dict[str, Any]) -> object:
    reasoning = body.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else body.get("reasoning_effort")
    if not effort:
        return None
    if effort not in ("high", "medium", "low", "none"):
        raise MiddlewareError(
            400, f'invalid reasoning value: \'{effort}\' (must be "high", "medium", "low", or "none")'
        )
    return False if effort == "none" else effort


def _format(body: dict[str, Any]) -> object:
    response_format = body.get("response_format")
    if not isinstance(response_format, dict):
        return None
    kind = str(response_format.get("type") or "").strip().lower()
    if kind == "json_object":
        return "json"
    schema = response_format.get("json_schema")
    if kind == "json_schema" and isinstance(schema, dict):
        return schema.get("schema")
    return None


class _OpenAIDialect:
    """Reading and errors shared by the three endpoints; ``bind`` differs."""

    struct_name = ""

    async def read(self, request: web.Request, go_type: str) -> dict[str, Any]:
        if not (await request.read()).strip():
            raise MiddlewareError(400, "EOF")  # what gin's ShouldBindJSON says
        try:
            return await read_json_object(request, f"openai.{self.struct_name}")
        except RequestError as err:
            raise MiddlewareError(err.status, err.message) from err

    def error(self, err: RequestError) -> web.Response:
        return error_response(err.status, err.message, _error_type(err.status))


class _Generating(_OpenAIDialect):
    """Chat and completions: a native request with `stream` as asked, answered by a stream writer."""

    id_prefix = ""

    def bind(self, body: dict[str, Any]) -> tuple[dict[str, Any], Writer]:
        _check(self.struct_name, body)
        stream = body.get("stream") is True
        native = {"model": body.get("model") or "", **self.convert(body), "stream": stream}
        response_id = f"{self.id_prefix}-{random.randrange(999)}"
        return native, self.writer(stream, _include_usage(body), response_id)

    def convert(self, body: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def writer(self, stream: bool, include_usage: bool, response_id: str) -> Writer:
        raise NotImplementedError


class _Chat(_Generating):
    struct_name = "ChatCompletionRequest"
    id_prefix = "chatcmpl"

    def convert(self, body: dict[str, Any]) -> dict[str, Any]:
        """openai.FromChatRequest."""
        if not body.get("messages"):
            raise MiddlewareError(400, "[] is too short - 'messages'")
        native: dict[str, Any] = {
            "messages": _messages(body["messages"]),
            "options": _sampling_options(body, strict_stop=False),
        }
        for key, value in (("format", _format(body)), ("tools", body.get("tools")), ("think", _think(body))):
            if value is not None:
                native[key] = value
        return native

    def writer(self, stream: bool, include_usage: bool, response_id: str) -> Writer:
        return ChatWriter(stream, include_usage, response_id)


class _Completions(_Generating):
    struct_name = "CompletionRequest"
    id_prefix = "cmpl"

    def convert(self, body: dict[str, Any]) -> dict[str, Any]:
        """openai.FromCompleteRequest."""
        options = _sampling_options(body, strict_stop=True)
        for key in ("frequency_penalty", "presence_penalty"):
            options.setdefault(key, 0.0)
        native: dict[str, Any] = {"prompt": body.get("prompt") or "", "options": options}
        if body.get("suffix"):
            native["suffix"] = body["suffix"]
        return native

    def writer(self, stream: bool, include_usage: bool, response_id: str) -> Writer:
        return CompleteWriter(stream, include_usage, response_id)


class _Embeddings(_OpenAIDialect):
    struct_name = "EmbedRequest"

    def bind(self, body: dict[str, Any]) -> tuple[dict[str, Any], Writer]:
        _check(self.struct_name, body)
        encoding = body.get("encoding_format") or ""
        if encoding and encoding.lower() not in ("float", "base64"):
            raise MiddlewareError(
                400,
                f"Invalid value for 'encoding_format' = {encoding}. Supported values: ['float', 'base64'].",
            )
        value = body.get("input")
        if value == "":
            value = [""]
        if value is None or value == []:
            raise MiddlewareError(400, "invalid input")
        native: dict[str, Any] = {"model": body.get("model") or "", "input": value}
        if body.get("dimensions"):
            native["dimensions"] = int(body["dimensions"])
        return native, EmbedWriter(body.get("model") or "", encoding)


# ------------------------------------------------------------------ writers


def _usage(obj: dict[str, Any]) -> dict[str, int]:
    prompt, completion = obj.get("prompt_eval_count", 0), obj.get("eval_count", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _StreamWriter:
    """Chunks for a streamed answer, usage and ``[DONE]`` after the last (ChatWriter, CompleteWriter)."""

    stream_type = SSE_TYPE
    zero_usage_in_chunks = False

    def __init__(self, stream: bool, include_usage: bool, response_id: str) -> None:
        self.stream = stream
        self.include_usage = include_usage
        self.id = response_id

    def chunk(self, obj: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def whole(self, obj: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def line(self, obj: dict[str, Any]) -> bytes:
        chunk = self.chunk(obj)
        if self.include_usage and self.zero_usage_in_chunks:
            chunk["usage"] = _usage({})
        frames = _event(chunk)
        if obj.get("done"):
            if self.include_usage:
                frames += _event({**chunk, "choices": [], "usage": _usage(obj)})
            frames += _DONE
        return frames

    def reply(self, obj: dict[str, Any]) -> web.Response:
        if self.stream:  # a load short-cut answers in one piece even to a streamed request
            return web.Response(body=self.line(obj), headers={"Content-Type": SSE_TYPE})
        return _json(self.whole(obj))


def _finish_reason(obj: dict[str, Any]) -> str | None:
    return obj.get("done_reason") or None


class ChatWriter(_StreamWriter):
    """openai.ToChunk / ToChatCompletion."""

    def _message(self, obj: dict[str, Any], role: str | None) -> dict[str, Any]:
        native = obj.get("message") or {}
        message = {"role": role or native.get("role", ""), "content": native.get("content", "")}
        if native.get("thinking"):
            message["reasoning"] = native["thinking"]
        return message

    def chunk(self, obj: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": obj.get("model", ""),
            "system_fingerprint": "fp_ollama",
            "choices": [
                {"index": 0, "delta": self._message(obj, "assistant"), "finish_reason": _finish_reason(obj)}
            ],
        }

    def whole(self, obj: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": obj.get("model", ""),
            "system_fingerprint": "fp_ollama",
            "choices": [
                {"index": 0, "message": self._message(obj, None), "finish_reason": _finish_reason(obj)}
            ],
            "usage": _usage(obj),
        }


class CompleteWriter(_StreamWriter):
    """openai.ToCompleteChunk / ToCompletion; with include_usage every chunk carries zero usage."""

    zero_usage_in_chunks = True

    def _choices(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"text": obj.get("response", ""), "index": 0, "finish_reason": _finish_reason(obj)}]

    def chunk(self, obj: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": int(time.time()),
            "choices": self._choices(obj),
            "model": obj.get("model", ""),
            "system_fingerprint": "fp_ollama",
        }

    def whole(self, obj: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": obj.get("model", ""),
            "system_fingerprint": "fp_ollama",
            "choices": self._choices(obj),
            "usage": _usage(obj),
        }


class EmbedWriter:
    """openai.ToEmbeddingList; ``encoding_format: base64`` packs little-endian float32."""

    stream_type = _JSON

    def __init__(self, model: str, encoding: str) -> None:
        self.model = model
        self.base64 = encoding.lower() == "base64"

    def _vector(self, vector: list[float]) -> object:
        if not self.base64:
            return vector
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

    def _whole(self, obj: dict[str, Any]) -> dict[str, Any]:
        vectors = obj.get("embeddings")
        if vectors is None:
            return {"object": "", "data": None, "model": "", "usage": {"prompt_tokens": 0, "total_tokens": 0}}
        tokens = obj.get("prompt_eval_count", 0)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "embedding": self._vector(v), "index": i}
                for i, v in enumerate(vectors)
            ]
            or None,
            "model": self.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def reply(self, obj: dict[str, Any]) -> web.Response:
        return _json(self._whole(obj))

    def line(self, obj: dict[str, Any]) -> bytes:
        return (dumps(self._whole(obj)) + "\n").encode()


CHAT = _Chat()
COMPLETIONS = _Completions()
EMBEDDINGS = _Embeddings()


# ------------------------------------------------------------------ handlers


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions`` (ChatMiddleware over ChatHandler)."""
    return await serve_inference(request, "chat", CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions`` (CompletionsMiddleware over GenerateHandler)."""
    return await serve_inference(request, "generate", COMPLETIONS)


async def embeddings(request: web.Request) -> web.StreamResponse:
    """``POST /v1/embeddings`` (EmbeddingsMiddleware over EmbedHandler)."""
    return await serve_inference(request, "embed", EMBEDDINGS)


def _namespace(name: str) -> str:
    """``model.ParseName(name).Namespace``: ``library`` unless the name says otherwise."""
    parts = name.split("/")
    return parts[-2] if len(parts) > 1 else "library"


async def list_models(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models``: the installed models, most recently modified first."""
    models = sorted(request.app[STUB].models.values(), key=lambda m: m.modified_at, reverse=True)
    data = [
        {
            "id": m.name,
            "object": "model",
            "created": int(m.modified_at.timestamp()),
            "owned_by": _namespace(m.name),
        }
        for m in models
    ]
    return await send(request, _json({"object": "list", "data": data or None}))


async def retrieve_model(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models/{model}``: the model as named, or a 404 from the show handler."""
    name = request.match_info["model"]
    model = request.app[STUB].find(name)
    if model is None:
        status, message = (
            (404, f"model '{name}' not found") if normalise(name) else (400, "model is required")
        )
        return await send(request, error_response(status, message, _error_type(status)))
    created = int(model.modified_at.timestamp())
    return await send(
        request, _json({"id": name, "object": "model", "created": created, "owned_by": _namespace(name)})
    )
