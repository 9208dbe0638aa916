"""Warming the next model: read its weights into the page cache while the loaded model drains.

Ollama loads a model from its blob file. A cold file comes from disk; a file
in the page cache comes from RAM, and the load is several times faster. The
worker knows which model it will load next, so it asks `Warmer.prepare` to
read that model's file ahead of time. The path comes from `/api/show`, which
names the blob after `FROM` in the modelfile. Where that file is not readable
(another user's files, or Ollama on another machine) nothing is read; the log
says so once per model and reason, at debug level where no file is there to read.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from contextlib import suppress

import structlog

from foreman.errors import ForemanError
from foreman.ollama.client import Upstream
from foreman.ollama.names import key_model_name

log = structlog.get_logger("foreman.warm")

_CHUNK = 8 * 1024 * 1024


def read_into_cache(path: str, stop: threading.Event) -> int:
    """Ask the kernel to cache `path` (WILLNEED), then read it through; returns the bytes read.

    WILLNEED alone starts readahead that the kernel may cut short; reading the
    file through makes sure every page was fetched. `stop` ends it early.
    """
    with open(path, "rb", buffering=0) as file:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
        buffer = bytearray(_CHUNK)
        total = 0
        while not stop.is_set():
            count = file.readinto(buffer)
            if not count:
                break
            total += count
        return total


Reader = Callable[[str, threading.Event], int]


def _exists(path: str) -> bool:
    """A stat, as quick as the os.access beside it: only asked once per model."""
    return os.path.exists(path)


class Warmer:
    """Warms one model at a time: a new target stops the read of the previous one."""

    def __init__(self, upstream: Upstream, read: Reader = read_into_cache) -> None:
        self._upstream = upstream
        self._read = read
        self._paths: dict[str, str | None] = {}  # model name → readable blob path, or None
        self._said: set[tuple[str, str]] = set()  # (model, reason) of each warm_skipped logged
        self._target: str | None = None
        self._stop = threading.Event()
        self._task: asyncio.Task[None] | None = None

    def prepare(self, model_key: str) -> None:
        """Start warming `model_key`'s blob, unless it is already the one being warmed."""
        name = key_model_name(model_key)
        if name == self._target:
            return
        self._target = name
        self._stop.set()
        self._stop = threading.Event()
        self._task = asyncio.create_task(self._warm(name, self._stop), name=f"foreman-warm {name}")

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task

    async def _warm(self, name: str, stop: threading.Event) -> None:
        path = await self._blob_path(name)
        if path is None:
            return
        started = time.monotonic()
        try:
            read = await asyncio.to_thread(self._read, path, stop)
        except OSError as exc:
            log.warning("model.warm_failed", model=name, path=path, error=str(exc))
            return
        log.info(
            "model.warm",
            model=name,
            path=path,
            bytes=read,
            complete=not stop.is_set(),
            seconds=round(time.monotonic() - started, 3),
            method="posix_fadvise+read",
        )

    async def _blob_path(self, name: str) -> str | None:
        """The model's blob if this process can read it; why it can't is logged once per model and reason."""
        if name in self._paths:
            return self._paths[name]
        try:
            path = await self._upstream.blob_path(name)
        except ForemanError as exc:
            # Not cached: Ollama may answer next time (but is not asked to be mentioned again).
            self._skipped(name, "no /api/show answer", quiet=True, error=exc.message)
            return None
        readable = path if path is not None and os.access(path, os.R_OK) else None
        if path is None:
            self._skipped(name, "no blob path in /api/show", quiet=True)
        elif readable is None:
            # A file that is there but not ours to read is worth a line (adding foreman's user to
            # Ollama's group fixes it); a path that is not on this machine at all, as with Ollama
            # on another host or the demo's stub, is nothing anyone can fix and stays at debug.
            self._skipped(name, "blob not readable by foreman", quiet=not _exists(path), path=path)
        self._paths[name] = readable
        return readable

    def _skipped(self, name: str, reason: str, *, quiet: bool, **fields: object) -> None:
        if (name, reason) in self._said:
            return
        self._said.add((name, reason))
        (log.debug if quiet else log.info)("model.warm_skipped", model=name, reason=reason, **fields)
