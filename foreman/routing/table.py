"""The routes in force: read at start, checked against Ollama's models, swapped on SIGHUP."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import aiohttp
import structlog

from foreman.errors import UpstreamFailed, UpstreamRejected, UpstreamUnreachable
from foreman.ollama.client import Upstream
from foreman.routing.routes_file import Routes, RoutesError, load

log = structlog.get_logger("foreman.routes")

# Checking names against Ollama's list must not hold up a start or a reload for long.
_TAGS_TIMEOUT = aiohttp.ClientTimeout(total=5)


class RouteTable:
    """The aliases and routes intake and the model lists use now; `current` changes only as a whole."""

    def __init__(self, path: Path | None, current: Routes | None = None) -> None:
        self.path = path
        self.current = current or Routes()

    async def start(self, upstream: Upstream) -> None:
        """Read the file; RoutesError (which stops foreman) if it is wrong or shadows a model of Ollama's."""
        if self.path is None:
            return
        routes = await asyncio.to_thread(load, self.path)
        await _check_names(routes, upstream)
        self.current = routes
        log.info("routes.loaded", path=str(self.path), **_summary(routes))

    async def reload(self, upstream: Upstream) -> bool:
        """Read the file again; if it is wrong, keep the routes in force and log why."""
        if self.path is None:
            log.info("routes.reload_skipped", reason="no routes file (FOREMAN_ROUTES)")
            return False
        try:
            routes = await asyncio.to_thread(load, self.path)
            await _check_names(routes, upstream)
        except RoutesError as exc:
            log.error("routes.reload_failed", error=str(exc), kept=_summary(self.current))
            return False
        self.current = routes
        log.info("routes.reloaded", path=str(self.path), **_summary(routes))
        return True

    @asynccontextmanager
    async def running(self, base_url: str, upstream: Callable[[], Upstream]) -> AsyncIterator[None]:
        """Load at start, and reload on SIGHUP (through `upstream()`) until the block ends.

        The start comes before anything else of the app's, so a wrong file
        stops foreman with nothing to clean up: its check of Ollama's model
        names uses a session of its own.
        """
        async with aiohttp.ClientSession() as session:
            await self.start(Upstream(session, base_url))
        reloads: set[asyncio.Task[bool]] = set()

        def on_hangup() -> None:
            task = asyncio.ensure_future(self.reload(upstream()))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop = asyncio.get_running_loop()
        handled = False
        # Handled even without a file: SIGHUP's default action would end foreman.
        # Only the main thread may handle signals (tests run apps elsewhere too).
        with suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, on_hangup)
            handled = True
        try:
            yield
        finally:
            if handled:
                loop.remove_signal_handler(signal.SIGHUP)
            for task in reloads:
                task.cancel()


async def _check_names(routes: Routes, upstream: Upstream) -> None:
    """RoutesError if an alias or route has the name of one of Ollama's models.

    If Ollama does not answer, the check waits for the next reload: foreman
    starts without Ollama, as it always does.
    """
    if not routes:
        return
    try:
        response = await upstream.send("GET", "/api/tags", timeout=_TAGS_TIMEOUT)
        async with response:
            body = await response.read()
        if response.status != 200:
            raise UpstreamFailed(f"/api/tags answered {response.status}")
        names = [m["name"] for m in json.loads(body)["models"] or []]
    except (aiohttp.ClientError, UpstreamUnreachable, UpstreamFailed, UpstreamRejected) as exc:
        log.warning("routes.unchecked", reason=f"cannot list Ollama's models: {exc}")
        return
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("routes.unchecked", reason=f"cannot list Ollama's models: {exc}")
        return
    problem = routes.shadowing(names)
    if problem is not None:
        raise RoutesError(problem)


def _summary(routes: Routes) -> dict[str, list[str]]:
    return {
        "aliases": [a.name for a in routes.aliases.values()],
        "routes": [r.name for r in routes.routes.values()],
    }
