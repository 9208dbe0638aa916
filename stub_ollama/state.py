"""The live state of a stub server: what tests assert on."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web

from .catalog import Installed
from .faults import Faults
from .keepalive import FOREVER
from .names import normalise
from .residency import RunnerOptions, Scheduler
from .settings import StubModel, StubSettings

logger = logging.getLogger("stub_ollama")


@dataclass(eq=False)
class StubRequest:
    """One request that reached an inference endpoint, as the stub saw it.

    ``model`` is the name exactly as sent and ``body`` the parsed JSON object
    (``None`` when the body was not a JSON object). ``arrived_at`` is
    ``time.monotonic()``. The other fields fill in as the request is served:
    ``status`` once a status line went out, ``chunks_sent`` NDJSON lines written,
    ``outcome`` one of ``pending``, ``ok``, ``load``, ``unload``, ``error``,
    ``failed`` (injected fault), ``dropped`` (injected), ``disconnected``.
    """

    path: str
    model: str | None
    body: dict[str, Any] | None
    arrived_at: float
    is_load: bool = False
    cloud: bool = False  # the model was a cloud name: served without loading anything
    status: int | None = None
    chunks_sent: int = 0
    finished: bool = False
    disconnected: bool = False
    outcome: str = "pending"
    error: str | None = None
    finished_at: float | None = None

    @property
    def prompt(self) -> str | None:
        """The text this request asked about: last message, prompt or joined input."""
        body = self.body or {}
        if self.path == "/v1/responses":
            value = body.get("input")
            if isinstance(value, list) and value and isinstance(value[-1], dict):
                value = value[-1].get("content")
            return value if isinstance(value, str) else None
        if self.path in ("/api/chat", "/v1/chat/completions", "/v1/messages"):
            messages = body.get("messages")
            if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
                content = messages[-1].get("content")
                if isinstance(content, list):  # OpenAI content parts, Anthropic blocks
                    content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
                return content if isinstance(content, str) else None
            return None
        if self.path in ("/api/embed", "/v1/embeddings"):
            value = body.get("input")
            if isinstance(value, list):
                return "\n".join(str(v) for v in value)
            return value if isinstance(value, str) else None
        prompt = body.get("prompt")
        return prompt if isinstance(prompt, str) else None


@dataclass(frozen=True, slots=True)
class ResidentModel:
    """A snapshot of one runner (loaded or loading)."""

    name: str
    loading: bool
    refcount: int
    keep_alive: float
    options: RunnerOptions
    expires_at: float  # epoch seconds; inf = forever


class Stub:
    """Records and controls of one stub server (``app[STUB]``).

    Lists tests assert on: :attr:`loads`, :attr:`evictions` (every unload: eviction
    for room, reload with other options, keep_alive expiry, unload request, aborted
    load, restart), :attr:`requests`. Counters: :attr:`in_flight` /
    :attr:`max_in_flight` count inference requests from arrival until their
    response finished (so a proxy sending two at once shows 2 even when the second
    waits); :attr:`generating` / :attr:`max_generating` count those holding one of
    a runner's ``num_parallel`` slots.
    """

    def __init__(self, settings: StubSettings | None = None) -> None:
        self.settings = settings or StubSettings()
        self.faults = Faults(on_change=self._changed)
        self.loads: list[str] = []
        self.evictions: list[str] = []
        self.requests: list[StubRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.generating = 0
        self.max_generating = 0
        self.models: dict[str, Installed] = {}
        self._event = asyncio.Event()
        now = datetime.now().astimezone()
        for index, spec in enumerate(self.settings.models):
            # Older entries get older times so /api/tags keeps the configured order.
            self.install(spec, modified_at=now - timedelta(minutes=index))
        self.scheduler = Scheduler(
            capacity=self.settings.capacity,
            num_parallel=self.settings.num_parallel,
            default_keep_alive=(
                FOREVER if self.settings.default_keep_alive < 0 else self.settings.default_keep_alive
            ),
            max_queue=self.settings.max_queue,
            load_delay=self._load_delay,
            on_load=self._on_load,
            on_unload=self._on_unload,
            on_change=self._changed,
        )

    # ---------------------------------------------------------------- queries

    def loaded(self) -> list[str]:
        """Models resident now (fully loaded), in load order."""
        return [name for name, r in self.scheduler.runners.items() if not r.loading]

    def loading(self) -> list[str]:
        """Models whose load is under way."""
        return [name for name, r in self.scheduler.runners.items() if r.loading]

    def resident(self) -> list[ResidentModel]:
        """Snapshots of every runner, loaded or loading."""
        return [
            ResidentModel(r.model, r.loading, r.refcount, r.keep_alive, r.options, r.expiry())
            for r in self.scheduler.runners.values()
        ]

    def keep_alive(self, model: str) -> float | None:
        """The keep-alive (seconds, inf = forever) of a resident model, or ``None``."""
        name = normalise(model)
        runner = self.scheduler.runners.get(name) if name else None
        return runner.keep_alive if runner is not None else None

    @property
    def pending(self) -> int:
        """Requests in the scheduler's pending queue (waiting for a load)."""
        return self.scheduler.pending

    def find(self, model: str) -> Installed | None:
        """The installed model ``model`` names (any accepted spelling), if any."""
        name = normalise(model)
        return self.models.get(name) if name else None

    def installed(self) -> list[str]:
        """Canonical names of the installed models."""
        return list(self.models)

    def inference_requests(self, exclude_loads: bool = True) -> list[StubRequest]:
        """Recorded requests, without load/unload short-cuts unless ``exclude_loads`` is false."""
        if not exclude_loads:
            return list(self.requests)
        return [r for r in self.requests if not r.is_load]

    # The brief's API takes a timeout; it is applied with asyncio.timeout inside.
    async def wait_for(
        self,
        predicate: Callable[[Stub], object],
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> None:
        """Wait until ``predicate(stub)`` is true, re-checking on every state change.

        Raises ``TimeoutError`` (with a state summary) after ``timeout`` seconds.
        """
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self):
                    await self._event.wait()
        except TimeoutError:
            raise TimeoutError(f"stub condition not met within {timeout}s: {self.summary()}") from None

    def summary(self) -> str:
        """A one-line description of the state, for failure messages."""
        return (
            f"loads={self.loads} evictions={self.evictions} loaded={self.loaded()} "
            f"loading={self.loading()} in_flight={self.in_flight} pending={self.pending} "
            f"requests={[(r.path, r.model, r.outcome) for r in self.requests]}"
        )

    # --------------------------------------------------------------- controls

    def install(self, spec: StubModel, modified_at: datetime | None = None, digest: str = "") -> Installed:
        """Add (or replace) an installed model; `digest` defaults to one derived from the name."""
        name = normalise(spec.name)
        if name is None:
            raise ValueError(f"invalid model name {spec.name!r}")
        entry = Installed(name, spec, modified_at or datetime.now().astimezone(), digest)
        self.models[name] = entry
        self._changed()
        return entry

    def uninstall(self, model: str) -> bool:
        """Remove an installed model; returns whether it existed."""
        name = normalise(model)
        if name is None or name not in self.models:
            return False
        del self.models[name]
        self._changed()
        return True

    def reset_records(self) -> None:
        """Clear loads, evictions, requests and the max counters (not residency or faults)."""
        self.loads.clear()
        self.evictions.clear()
        self.requests.clear()
        self.max_in_flight = self.in_flight
        self.max_generating = self.generating
        self._changed()

    def restart(self) -> None:
        """Forget loaded models and the pending queue, as an Ollama restart does.

        Each resident model is recorded in :attr:`evictions`.
        """
        logger.info("restart: forgetting %s", list(self.scheduler.runners))
        self.scheduler.reset()

    async def close(self) -> None:
        """Stop timers and background tasks (app cleanup)."""
        self.faults.release_hung()
        await self.scheduler.close()

    # ------------------------------------------------------- used by handlers

    def arrive(self, path: str) -> StubRequest:
        """Record a request arriving at an inference endpoint."""
        record = StubRequest(path=path, model=None, body=None, arrived_at=time.monotonic())
        self.requests.append(record)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._changed()
        return record

    def depart(self, record: StubRequest) -> None:
        """Record that a request's response finished (or was abandoned)."""
        record.finished = True
        record.finished_at = time.monotonic()
        self.in_flight -= 1
        logger.info(
            "request %s model=%s outcome=%s status=%s",
            record.path,
            record.model,
            record.outcome,
            record.status,
        )
        self._changed()

    def start_generating(self) -> None:
        """A request took a runner slot."""
        self.generating += 1
        self.max_generating = max(self.max_generating, self.generating)
        self._changed()

    def stop_generating(self) -> None:
        """A request gave its runner slot back."""
        self.generating -= 1
        self._changed()

    def changed(self) -> None:
        """Wake :meth:`wait_for` callers (handlers call this after updating a record)."""
        self._changed()

    # -------------------------------------------------------------- internals

    def _changed(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    def _load_delay(self, model: str) -> float:
        entry = self.models.get(model)
        if entry is not None and entry.spec.load_delay is not None:
            return entry.spec.load_delay
        return self.settings.load_delay

    def _on_load(self, model: str) -> None:
        self.loads.append(model)
        logger.info("load %s", model)

    def _on_unload(self, model: str, reason: str) -> None:
        self.evictions.append(model)
        logger.info("unload %s (%s)", model, reason)


STUB: web.AppKey[Stub] = web.AppKey("stub", Stub)
"""Where :func:`stub_ollama.create_app` keeps the :class:`Stub` (``app[STUB]``)."""
