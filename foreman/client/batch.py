"""`foreman batch`: submit a JSONL file as an OpenAI batch, list, show, cancel, and fetch results.

It speaks the daemon's `/v1/files` and `/v1/batches` (docs/batches.md), the
same API the openai SDK uses, so a batch submitted here can be followed from
a program and the other way round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO
from urllib.parse import quote

import aiohttp

from foreman.client.daemon import Daemon, Json, Rejected
from foreman.client.progress import Progress
from foreman.client.submit import BadInput

ENDED = ("completed", "failed", "cancelled", "expired")
DEFAULT_ENDPOINT = "/v1/chat/completions"


async def run(daemon: Daemon, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    command = args.batch_command
    if command == "submit":
        return await submit(daemon, args, out, err)
    if command == "list":
        page = await daemon._call("GET", "/v1/batches", params={"limit": str(args.limit)})
        out.write(json.dumps(page, indent=2) + "\n" if args.json else format_list(page["data"]))
        return 0
    if command == "show":
        view = await _batch(daemon, args.id)
        out.write(json.dumps(view, indent=2) + "\n" if args.json else format_batch(view))
        return 0
    if command == "cancel":
        view = await daemon._call("POST", f"/v1/batches/{quote(args.id, safe='')}/cancel")
        out.write(f"{view['id']} {view['status']}\n")
        return 0
    return await results(daemon, args, out)


async def submit(daemon: Daemon, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    path = Path(args.file)
    try:
        content = await asyncio.to_thread(path.read_bytes)
    except OSError as exc:
        raise BadInput(f"cannot read {path}: {exc}") from exc
    endpoint = args.endpoint or _first_url(content) or DEFAULT_ENDPOINT
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", content, filename=path.name, content_type="application/jsonl")
    file = await daemon._call("POST", "/v1/files", data=form)
    batch = await daemon._call(
        "POST",
        "/v1/batches",
        json={"input_file_id": file["id"], "endpoint": endpoint, "completion_window": "24h"},
    )
    if not args.json:
        out.write(f"{batch['id']}\n")
        out.flush()
    if not args.wait:
        if args.json:
            out.write(json.dumps(batch, indent=2) + "\n")
        return 0
    view = await wait(daemon, batch["id"], args.interval, err)
    if args.json:
        out.write(json.dumps(view, indent=2) + "\n")
    counts = view["request_counts"]
    err.write(
        f"{view['id']} {view['status']}: {counts['completed']} done, {counts['failed']} failed of {counts['total']}"
        + (f"; foreman batch results {view['id']}" if view.get("output_file_id") else "")
        + "\n"
    )
    return 0 if view["status"] == "completed" else 1


async def wait(daemon: Daemon, batch_id: str, interval: float, err: TextIO) -> Json:
    """The batch once it ended, with a progress bar on `err` once its lines are known."""
    progress: Progress | None = None
    try:
        while True:
            view = await _batch(daemon, batch_id)
            counts = view["request_counts"]
            if progress is None and counts["total"]:
                progress = Progress(err, counts["total"])
            if progress is not None:
                progress.update(counts["completed"], counts["failed"])
            if view["status"] in ENDED:
                return view
            await asyncio.sleep(interval)
    finally:
        if progress is not None:
            progress.close()


async def results(daemon: Daemon, args: argparse.Namespace, out: TextIO) -> int:
    view = await _batch(daemon, args.id)
    file_id = view.get("error_file_id" if args.errors else "output_file_id")
    if file_id is None:
        if view["status"] not in ENDED:
            raise Rejected(f"batch {args.id} is {view['status']}: its results come when it ends", 409)
        what = "error" if args.errors else "output"
        raise Rejected(f"batch {args.id} ({view['status']}) has no {what} file", 404)
    async with daemon.session.get(f"{daemon.url}/v1/files/{quote(file_id, safe='')}/content") as response:
        if response.status >= 400:
            raise Rejected(f"the daemon answered {response.status} for file {file_id}", response.status)
        content = await response.read()
    if args.output:
        await asyncio.to_thread(Path(args.output).write_bytes, content)
    else:
        out.flush()
        stream = getattr(out, "buffer", None)
        if stream is not None:
            stream.write(content)
            stream.flush()
        else:
            out.write(content.decode())
    return 0


async def _batch(daemon: Daemon, batch_id: str) -> Json:
    return await daemon._call("GET", f"/v1/batches/{quote(batch_id, safe='')}")


def iso(timestamp: float | None) -> str | None:
    """OpenAI's Unix seconds as ISO 8601 in UTC."""
    if not timestamp:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _first_url(content: bytes) -> str | None:
    for raw in content.splitlines():
        if raw.strip():
            try:
                item = json.loads(raw)
            except ValueError:
                return None
            url = item.get("url") if isinstance(item, dict) else None
            return url if isinstance(url, str) else None
    return None


def format_list(batches: list[Json]) -> str:
    if not batches:
        return "no batches\n"
    rows = [("ID", "STATUS", "ENDPOINT", "DONE", "FAILED", "TOTAL", "CREATED")]
    for b in batches:
        c = b["request_counts"]
        rows.append(
            (
                b["id"],
                b["status"],
                b["endpoint"],
                str(c["completed"]),
                str(c["failed"]),
                str(c["total"]),
                iso(b["created_at"]) or "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n" for row in rows
    )


def format_batch(b: Json) -> str:
    c = b["request_counts"]
    lines = [
        f"{b['id']}  {b['status']}",
        f"endpoint   {b['endpoint']}",
        f"requests   {c['completed']} done, {c['failed']} failed of {c['total']}",
        f"input      {b['input_file_id']}",
    ]
    if b.get("output_file_id"):
        lines.append(f"output     {b['output_file_id']}")
    if b.get("error_file_id"):
        lines.append(f"errors     {b['error_file_id']}")
    for name in (
        "created_at",
        "in_progress_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "cancelling_at",
        "cancelled_at",
        "expired_at",
        "expires_at",
    ):
        if b.get(name):
            lines.append(f"{name.removesuffix('_at'):<10} {iso(b[name])}")
    for error in (b.get("errors") or {}).get("data") or []:
        where = f"line {error['line']}: " if error.get("line") else ""
        lines.append(f"error      {where}{error.get('message')} ({error.get('code')})")
    return "\n".join(lines) + "\n"
