"""`POST /v1/audio/transcriptions`: a multipart upload that becomes a job with its body kept as it came.

Ollama's `TranscriptionMiddleware` (`middleware/openai.go`) reads a
`multipart/form-data` form (`model`, `file`, optional `response_format`,
`language`, `prompt`) and runs it as a chat request, so it loads a model
like any chat. foreman queues it like the others, but the job keeps the
upload byte for byte; the boundary that frames it is read back from the
body's first line when the worker sends it (`foreman.job.body_content_type`), so the job
needs no column of its own for its Content-Type.
"""

from __future__ import annotations

from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP

from foreman.errors import BadRequest
from foreman.job import boundary_of


def form_fields(raw: bytes, content_type: str | None) -> tuple[str, bytes]:
    """The `model` and the `file` of a transcription upload; BadRequest as Ollama words it."""
    boundary = boundary_of(raw)
    if not content_type or not content_type.lower().startswith("multipart/form-data") or boundary is None:
        raise BadRequest("failed to parse multipart form: request Content-Type isn't multipart/form-data")
    header = f'Content-Type: multipart/form-data; boundary="{boundary}"\r\n\r\n'.encode()
    message = BytesParser(policy=HTTP).parsebytes(header + raw)
    if not message.is_multipart():
        raise BadRequest("failed to parse multipart form: no parts")
    model, audio = "", None
    for part in message.iter_parts():
        assert isinstance(part, Message)
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        value = payload if isinstance(payload, bytes) else b""
        if name == "model":
            model = value.decode("utf-8", "replace").strip()
        elif name == "file":
            audio = value
    if not model:
        raise BadRequest("model is required")
    if audio is None:
        raise BadRequest("file is required: http: no such file")
    if not audio:
        raise BadRequest("audio file is empty")
    return model, audio
