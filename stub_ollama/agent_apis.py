"""The two agent APIs Ollama serves over its chat handler: OpenAI Responses (``/v1/responses``)
and Anthropic Messages (``/v1/messages``).

Built as Ollama builds them (``middleware/openai.go`` ``ResponsesMiddleware`` over
``openai/responses.go``; ``middleware/anthropic.go`` over ``anthropic/anthropic.go``):
the request is bound and turned into a native chat request, the chat handler
serves it (same scheduler, residency, faults and records), and a writer turns
each chat object into the API's shape. What follows from that:

* ``stream`` defaults to false; there is no ``keep_alive`` and no ``options``.
* Streams are Server-Sent Events with a name on every frame (``event: NAME``,
  then ``data: {json}`` whose ``type`` is the same name), and no ``[DONE]``: a
  Responses stream ends with ``response.completed``, a Messages one with
  ``message_stop``.
* Errors: Responses uses OpenAI's ``{"error": {"message", "type", "param", "code"}}``;
  Messages ``{"type": "error", "error": {"type", "message"}, "request_id"}``.
* A mid-stream failure writes nothing: the native error line decodes as an
  empty chat object, which makes no event, and the stream stops short.
"""

from __future__ import annotations

import random
import time
from typing import Any

from aiohttp import web

from .inference import Writer, serve_inference
from .openai_compat import SSE_TYPE, MiddlewareError, error_response
from .wire import RequestError, dumps, is_go_int, read_json_object

_JSON = "application/json"


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=(dumps(obj) + "\n").encode(), headers={"Content-Type": _JSON})


def _named(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {dumps(event)}\n\n".encode()


def _text(content: object) -> str:
    """The text of a string or of a list of text parts or blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
    return ""


class _Agent:
    """Reading shared by both APIs (gin's ShouldBindJSON)."""

    struct_name = ""

    async def read(self, request: web.Request, go_type: str) -> dict[str, Any]:
        if not (await request.read()).strip():
            raise MiddlewareError(400, "EOF")
        try:
            return await read_json_object(request, self.struct_name)
        except RequestError as err:
            raise MiddlewareError(err.status, err.message) from err


# ------------------------------------------------------------------ Responses


class _Responses(_Agent):
    struct_name = "openai.ResponsesRequest"

    def error(self, err: RequestError) -> web.Response:
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(err.status, "api_error")
        return error_response(err.status, err.message, kind)

    def bind(self, body: dict[str, Any]) -> tuple[dict[str, Any], Writer]:
        """openai.FromResponsesRequest, for text input."""
        messages: list[dict[str, Any]] = []
        instructions = body.get("instructions")
        if isinstance(instructions, str) and instructions:
            messages.append({"role": "system", "content": instructions})
        value = body.get("input")
        if isinstance(value, str):
            if value:
                messages.append({"role": "user", "content": value})
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if not isinstance(item, dict):
                    raise MiddlewareError(400, f"input[{index}]: not an object")
                kind = item.get("type") or ("message" if item.get("role") else "")
                if kind != "message":
                    raise MiddlewareError(400, f"input[{index}]: unknown input item type: {kind!r}")
                messages.append({"role": item.get("role") or "user", "content": _text(item.get("content"))})
        elif value is not None:
            raise MiddlewareError(400, "input must be a string or array")
        options: dict[str, Any] = {}
        if is_go_int(body.get("max_output_tokens")):
            options["num_predict"] = body["max_output_tokens"]
        stream = body.get("stream") is True
        native = {
            "model": body.get("model") or "",
            "messages": messages,
            "stream": stream,
            "options": options,
        }
        model = body.get("model") or ""
        return native, ResponsesWriter(model, stream)


def _usage(obj: dict[str, Any]) -> dict[str, Any]:
    prompt, output = obj.get("prompt_eval_count", 0), obj.get("eval_count", 0)
    return {
        "input_tokens": prompt,
        "output_tokens": output,
        "total_tokens": prompt + output,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }


class ResponsesWriter:
    """openai.ResponsesStreamConverter and ToResponse, for text output."""

    stream_type = SSE_TYPE

    def __init__(self, model: str, stream: bool) -> None:
        self.model = model
        self.stream = stream
        self.id = f"resp_{random.randrange(999999)}"
        self.item_id = f"msg_{random.randrange(999999)}"
        self.created_at = int(time.time())
        self.sequence = 0
        self.text = ""
        self.started = False

    def _response(self, status: str, output: list[Any], usage: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": output,
            "error": None,
            "tools": [],
            "tool_choice": "auto",
            "parallel_tool_calls": True,
            "usage": usage,
        }

    def _message(self, status: str) -> dict[str, Any]:
        return {
            "id": self.item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}],
        }

    def _event(self, kind: str, **data: Any) -> bytes:
        event = {"type": kind, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return _named(event)

    def reply(self, obj: dict[str, Any]) -> web.Response:
        if self.stream:  # a load short-cut answers in one piece even to a streamed request
            return web.Response(body=self.line(obj), headers={"Content-Type": SSE_TYPE})
        self.text = (obj.get("message") or {}).get("content", "")
        response = self._response("completed", [self._message("completed")], _usage(obj))
        return _json({**response, "completed_at": int(time.time())})

    def line(self, obj: dict[str, Any]) -> bytes:
        if "error" in obj:
            return b""  # decodes as an empty chat object: no event
        frames = b""
        if not self.started:
            self.started = True
            frames += self._event("response.created", response=self._response("in_progress", [], None))
            frames += self._event("response.in_progress", response=self._response("in_progress", [], None))
        content = (obj.get("message") or {}).get("content", "")
        if content:
            if not self.text:
                frames += self._event(
                    "response.output_item.added",
                    output_index=0,
                    item={**self._message("in_progress"), "content": []},
                )
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                frames += self._event(
                    "response.content_part.added",
                    item_id=self.item_id,
                    output_index=0,
                    content_index=0,
                    part=part,
                )
            self.text += content
            frames += self._event(
                "response.output_text.delta",
                item_id=self.item_id,
                output_index=0,
                content_index=0,
                delta=content,
                logprobs=[],
            )
        if obj.get("done"):
            where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
            frames += self._event("response.output_text.done", **where, text=self.text, logprobs=[])
            part = self._message("completed")["content"][0]
            frames += self._event("response.content_part.done", **where, part=part)
            frames += self._event(
                "response.output_item.done", output_index=0, item=self._message("completed")
            )
            response = self._response("completed", [self._message("completed")], _usage(obj))
            frames += self._event(
                "response.completed", response={**response, "completed_at": int(time.time())}
            )
        return frames


# ------------------------------------------------------------------ Anthropic Messages


def anthropic_error(status: int, message: str) -> web.Response:
    """anthropic.NewError, written like Go's json.Encoder."""
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error"}
    kinds |= {404: "not_found_error", 429: "rate_limit_error", 503: "overloaded_error"}
    body = {
        "type": "error",
        "error": {"type": kinds.get(status, "api_error"), "message": message},
        "request_id": f"req_{random.randrange(10**12)}",
    }
    return _json(body, status)


class _Messages(_Agent):
    struct_name = "anthropic.MessagesRequest"

    def error(self, err: RequestError) -> web.Response:
        return anthropic_error(err.status, err.message)

    def bind(self, body: dict[str, Any]) -> tuple[dict[str, Any], Writer]:
        """AnthropicMessagesMiddleware's checks and anthropic.FromMessagesRequest, for text."""
        if not body.get("model"):
            raise MiddlewareError(400, "model is required")
        max_tokens = body.get("max_tokens")
        if not is_go_int(max_tokens) or max_tokens <= 0:
            raise MiddlewareError(400, "max_tokens is required and must be positive")
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise MiddlewareError(400, "messages is required")
        messages: list[dict[str, Any]] = []
        system = _text(body.get("system"))
        if system:
            messages.append({"role": "system", "content": system})
        for message in body["messages"]:
            if not isinstance(message, dict):
                raise MiddlewareError(
                    400, "json: cannot unmarshal into Go value of type anthropic.MessageParam"
                )
            messages.append({"role": message.get("role") or "user", "content": _text(message.get("content"))})
        stream = body.get("stream") is True
        native = {
            "model": body["model"],
            "messages": messages,
            "stream": stream,
            "options": {"num_predict": max_tokens},
        }
        return native, MessagesWriter(body["model"], stream)


_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


class MessagesWriter:
    """anthropic.StreamConverter and ToMessagesResponse, for text output."""

    stream_type = SSE_TYPE

    def __init__(self, model: str, stream: bool) -> None:
        self.model = model
        self.stream = stream
        self.id = f"msg_{random.randrange(16**24):024x}"
        self.started = False
        self.block_open = False

    def _message(self, content: list[Any], obj: dict[str, Any]) -> dict[str, Any]:
        message: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "usage": {
                "input_tokens": obj.get("prompt_eval_count", 0),
                "output_tokens": obj.get("eval_count", 0),
            },
        }
        reason = _STOP_REASONS.get(obj.get("done_reason") or "")
        if reason:
            message["stop_reason"] = reason
        return message

    def reply(self, obj: dict[str, Any]) -> web.Response:
        if self.stream:
            return web.Response(body=self.line(obj), headers={"Content-Type": SSE_TYPE})
        text = (obj.get("message") or {}).get("content", "")
        return _json(self._message([{"type": "text", "text": text}], obj))

    def line(self, obj: dict[str, Any]) -> bytes:
        if "error" in obj:
            return b""
        frames = b""
        if not self.started:
            self.started = True
            frames += _named({"type": "message_start", "message": self._message([], {})})
        content = (obj.get("message") or {}).get("content", "")
        if content:
            if not self.block_open:
                self.block_open = True
                block = {"type": "text", "text": ""}
                frames += _named({"type": "content_block_start", "index": 0, "content_block": block})
            delta = {"type": "text_delta", "text": content}
            frames += _named({"type": "content_block_delta", "index": 0, "delta": delta})
        if obj.get("done"):
            if self.block_open:
                frames += _named({"type": "content_block_stop", "index": 0})
            reason = _STOP_REASONS.get(obj.get("done_reason") or "", "end_turn")
            usage = {
                "input_tokens": obj.get("prompt_eval_count", 0),
                "output_tokens": obj.get("eval_count", 0),
            }
            frames += _named({"type": "message_delta", "delta": {"stop_reason": reason}, "usage": usage})
            frames += _named({"type": "message_stop"})
        return frames


RESPONSES = _Responses()
MESSAGES = _Messages()


async def responses(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses`` (ResponsesMiddleware over ChatHandler)."""
    return await serve_inference(request, "chat", RESPONSES)


async def messages(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages`` (AnthropicMessagesMiddleware over ChatHandler)."""
    return await serve_inference(request, "chat", MESSAGES)
