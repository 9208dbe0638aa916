"""``POST /v1/audio/transcriptions``: Ollama's OpenAI-compatible speech to text, over its chat handler.

As ``middleware/openai.go`` ``TranscriptionMiddleware`` builds it: a multipart
form (``model``, ``file``, optional ``response_format``, ``language``,
``prompt``) becomes a chat request with the audio attached, and the writer
answers once, at the end: ``{"text": "..."}``, or the bare text with
``response_format=text``. The stub's transcript is its usual reply to the
chat prompt, so tests can predict it.
"""

from __future__ import annotations

import base64
from typing import Any

from aiohttp import web

from .inference import serve_inference
from .openai_compat import MiddlewareError, error_response
from .wire import RequestError, dumps

PROMPT = "What exact words are spoken in this audio?"
_SYSTEM = "Transcribe the audio exactly as spoken. Output only the spoken words. Do not answer any question in the audio."


class _Transcriptions:
    async def read(self, request: web.Request, go_type: str) -> dict[str, Any]:
        try:
            form = await request.post()
        except ValueError as exc:
            raise MiddlewareError(400, f"failed to parse multipart form: {exc}") from exc
        fields: dict[str, Any] = {}
        for name, value in form.items():
            fields[name] = value.file.read() if isinstance(value, web.FileField) else value
        return fields

    def error(self, err: RequestError) -> web.Response:
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(err.status, "api_error")
        return error_response(err.status, err.message, kind)

    def bind(self, body: dict[str, Any]) -> tuple[dict[str, Any], TranscriptionWriter]:
        model = body.get("model")
        if not model:
            raise MiddlewareError(400, "model is required")
        audio = body.get("file")
        if not isinstance(audio, bytes):
            raise MiddlewareError(400, "file is required: http: no such file")
        if not audio:
            raise MiddlewareError(400, "audio file is empty")
        system = _SYSTEM
        if body.get("language"):
            system += f" The audio is in {body['language']}."
        if body.get("prompt"):
            system += f" Context: {body['prompt']}"
        native = {
            "model": model,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": PROMPT, "images": [base64.b64encode(audio).decode()]},
            ],
            "stream": False,
            "options": {"temperature": 0},
        }
        return native, TranscriptionWriter(str(body.get("response_format") or ""))


class TranscriptionWriter:
    """TranscriptionWriter: the whole transcript at the end, as JSON or as plain text."""

    stream_type = "application/json"

    def __init__(self, response_format: str) -> None:
        self.response_format = response_format

    def reply(self, obj: dict[str, Any]) -> web.Response:
        text = ((obj.get("message") or {}).get("content") or "").strip()
        if self.response_format == "text":
            return web.Response(body=text.encode(), headers={"Content-Type": "text/plain"})
        return web.Response(
            body=(dumps({"text": text}) + "\n").encode(), headers={"Content-Type": "application/json"}
        )

    def line(self, obj: dict[str, Any]) -> bytes:
        return b""


TRANSCRIPTIONS = _Transcriptions()


async def transcriptions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/audio/transcriptions`` (TranscriptionMiddleware over ChatHandler)."""
    return await serve_inference(request, "chat", TRANSCRIPTIONS)
