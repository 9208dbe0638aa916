"""OpenAI's Files API, for batches: `/v1/files` upload, list, get, content and delete.

Files live in foreman's database (every node of a shared queue sees them).
An upload streams in part by part and stops at the first byte past
FOREMAN_FILE_MAX (OpenAI's 200 MB for a batch file by default), so a big or
endless upload never sits in memory whole before its 400.
"""

from __future__ import annotations

from aiohttp import BodyPartReader, web
from ulid import ULID

from foreman.api.batches import BATCHES, int_param, page
from foreman.api.keys import CLOCK, CONFIG
from foreman.batches import lines
from foreman.batches.service import file_view
from foreman.errors import BadRequest, NotFound
from foreman.storage.batches import PART_BYTES, StoredFile

# The purposes foreman keeps files for: those of the Batch API.
PURPOSES = ("batch",)
MAX_LIST = 10_000


async def upload(request: web.Request) -> web.Response:
    """POST /v1/files: a multipart form with `purpose` and `file`."""
    app = request.app
    limit = app[CONFIG].file_max
    if not request.content_type.startswith("multipart/"):
        raise BadRequest("upload a file as multipart/form-data with the fields 'purpose' and 'file'")
    purpose: str | None = None
    filename: str | None = None
    parts: list[bytes] = []
    size = 0
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise BadRequest("nested multipart bodies are not supported")
        if part.name == "purpose":
            purpose = (await part.text()).strip()
        elif part.name == "file":
            filename = part.filename or "file.jsonl"
            buffer = bytearray()
            while chunk := await part.read_chunk(64 * 1024):
                size += len(chunk)
                if size > limit:
                    raise BadRequest(
                        f"File is too large: foreman takes files of at most {limit} bytes (FOREMAN_FILE_MAX)."
                    )
                buffer += chunk
                while len(buffer) >= PART_BYTES:
                    parts.append(bytes(buffer[:PART_BYTES]))
                    del buffer[:PART_BYTES]
            parts.append(bytes(buffer))
        else:
            await part.release()
    if filename is None:
        raise BadRequest("Missing required parameter: 'file'.")
    if purpose is None:
        raise BadRequest("Missing required parameter: 'purpose'.")
    if purpose not in PURPOSES:
        raise BadRequest(
            f"Invalid value for 'purpose': foreman keeps files for batches only ('batch'), not {purpose!r}."
        )
    count = _count_lines(parts)
    if count > lines.MAX_LINES:
        raise BadRequest(f"The file has {count} lines; a batch file may have at most {lines.MAX_LINES}.")
    if count == 0:
        raise BadRequest("The file is empty: a batch file has one JSON request per line.")
    file = StoredFile(f"file-{ULID()}", filename, purpose, size, app[CLOCK]())
    await app[BATCHES].batches.put_file(file, [p for p in parts if p] or [b""])
    return web.json_response(file_view(file))


def _count_lines(parts: list[bytes]) -> int:
    """The lines of a file in parts, without joining them: a last line needs no newline."""
    last = next((part for part in reversed(parts) if part), b"")
    return sum(part.count(b"\n") for part in parts) + (1 if last and not last.endswith(b"\n") else 0)


async def list_files(request: web.Request) -> web.Response:
    """GET /v1/files: newest first by default; `purpose`, `limit`, `order`, `after`."""
    query = request.query
    limit = int_param(query.get("limit"), 10_000, 1, MAX_LIST, "limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadRequest("Invalid value for 'order': use 'asc' or 'desc'.")
    files = await request.app[BATCHES].batches.files(
        purpose=query.get("purpose") or None,
        after=query.get("after") or None,
        limit=limit + 1,
        newest_first=order == "desc",
    )
    return web.json_response(page([file_view(f) for f in files], limit))


async def get_file(request: web.Request) -> web.Response:
    file = await request.app[BATCHES].batches.file(request.match_info["id"])
    if file is None:
        raise NotFound(f"No such File object: {request.match_info['id']}")
    return web.json_response(file_view(file))


async def file_content(request: web.Request) -> web.Response:
    file_id = request.match_info["id"]
    content = await request.app[BATCHES].batches.content(file_id)
    if content is None:
        raise NotFound(f"No such File object: {file_id}")
    return web.Response(body=content, content_type="application/octet-stream")


async def delete_file(request: web.Request) -> web.Response:
    file_id = request.match_info["id"]
    if not await request.app[BATCHES].batches.delete_file(file_id):
        raise NotFound(f"No such File object: {file_id}")
    return web.json_response({"id": file_id, "object": "file", "deleted": True})


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/files", upload)
    app.router.add_get("/v1/files", list_files, allow_head=False)
    app.router.add_get("/v1/files/{id}", get_file, allow_head=False)
    app.router.add_get("/v1/files/{id}/content", file_content, allow_head=False)
    app.router.add_delete("/v1/files/{id}", delete_file)
