"""Which model each name stands for right now: Ollama's model list (`/api/tags`), names and digests.

The embedding cache keys its vectors by digest, so it must never use a digest
that went stale. The list is read again when a request that changes models
(pull, create, copy, delete) passes through foreman, before any digest is
used after it, and every FOREMAN_CACHE_REFRESH seconds for changes made
behind foreman's back. `epoch` counts the changes, so work that began under
an older list can tell (a vector computed while a pull ran is not cached).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
import structlog

from foreman.errors import UpstreamFailed, UpstreamRejected, UpstreamUnreachable
from foreman.ollama.client import Upstream
from foreman.ollama.names import key_model_name, normalise_model
from foreman.retry import Sleep

log = structlog.get_logger("foreman.models")

# Paths that change what a model name stands for when they pass through foreman.
MODEL_CHANGES = frozenset({"/api/pull", "/api/create", "/api/copy", "/api/delete"})
# Requests wait for a read of the list: it must be short, and after one
# failed, the next waits a while, so that an Ollama that does not answer
# slows no request down (the cache is simply not used meanwhile).
_READ_TIMEOUT = aiohttp.ClientTimeout(total=2)
_RETRY_AFTER_S = 5.0


class ModelTags:
    """Ollama's installed models and their digests, as of the latest read."""

    def __init__(self, upstream: Upstream, on_change: Callable[[set[str]], object] | None = None) -> None:
        """`on_change` gets the digests no installed model has any more, after each read that changed the list."""
        self._upstream = upstream
        self.on_change = on_change
        self._digests: dict[str, str] = {}
        self._fresh = False  # False: read /api/tags before the next digest is used
        self._reading: asyncio.Future[None] | None = None
        self._failed_at: float | None = None  # time.monotonic() of the latest failed read
        self.epoch = 0

    def stale(self) -> None:
        """A model may have changed: no digest is used again before the list was read again."""
        self._fresh = False
        self.epoch += 1

    async def digest(self, model_key: str) -> str | None:
        """The digest of the model in `model_key` now; None if Ollama cannot say (unreachable, not installed)."""
        if not self._fresh and not await self._read_again():
            return None
        return self._digests.get(key_model_name(model_key))

    async def has(self, model: str) -> bool | None:
        """Whether Ollama has `model` installed, read again once before a no; None if Ollama cannot say.

        Intake refuses a model Ollama does not have, as Ollama does: a name
        missing from the list makes it read `/api/tags` again, so a model pulled
        a moment ago, even behind foreman's back, is found.
        """
        name = normalise_model(model)
        if self._fresh and name in self._digests:
            return True
        if not await self._read_again():
            return None
        return name in self._digests

    async def _read_again(self) -> bool:
        """Read the list again unless a read failed moments ago; False when Ollama cannot say."""
        if self._failed_at is not None and time.monotonic() - self._failed_at < _RETRY_AFTER_S:
            return False
        try:
            await self.refresh()
        except (UpstreamUnreachable, UpstreamFailed, UpstreamRejected) as exc:
            # The worker reports outages; here it only means no cache and no intake check for now.
            log.debug("models.read_failed", error=exc.message)
            return False
        return True

    async def refresh(self) -> None:
        """Read `/api/tags` (one read at a time: callers that come meanwhile share it)."""
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read())
        reading = self._reading
        try:
            await asyncio.shield(reading)
        finally:
            if self._reading is reading and reading.done():
                self._reading = None

    async def _read(self) -> None:
        epoch = self.epoch
        try:
            digests = await self._upstream.installed_models(timeout=_READ_TIMEOUT)
        except BaseException:
            self._failed_at = time.monotonic()
            raise
        self._failed_at = None
        previous, self._digests = self._digests, digests
        # A change that passed through during the read may not show in it yet.
        self._fresh = self.epoch == epoch
        changed = sorted(
            name for name in previous.keys() | digests.keys() if previous.get(name) != digests.get(name)
        )
        if not changed or not previous:
            return
        self.epoch += 1
        gone = set(previous.values()) - set(digests.values())
        log.info("models.changed", models=changed, digests_gone=len(gone))
        if gone and self.on_change is not None:
            self.on_change(gone)

    async def refresh_forever(self, interval: float, sleep: Sleep = asyncio.sleep) -> None:
        """Read the list every `interval` seconds, for changes made to Ollama directly."""
        while True:
            await sleep(interval)
            try:
                await self.refresh()
            except (UpstreamUnreachable, UpstreamFailed, UpstreamRejected) as exc:
                log.debug("models.read_failed", error=exc.message)
