"""What Ollama holds for foreman: the resident models, the pins that keep them, the loads that swap them.

foreman reads `/api/ps` at start, after a swap, after an idle spell, and when
a reply shows Ollama loaded a model behind its back (`recheck`). While a
model has more work waiting, its requests carry `FOREMAN_PIN_KEEP_ALIVE`
(a pin); the last one hands Ollama back its own expiry. Before a load, pins
are moved so that Ollama evicts the model the policy chose (`make_room`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog

from foreman.errors import UpstreamFailed, UpstreamRejected, UpstreamUnreachable
from foreman.models import Job
from foreman.names import key_load_options, key_model_name
from foreman.outages import Outages
from foreman.retry import RetryPolicy, Sleep
from foreman.upstream import Upstream

log = structlog.get_logger("foreman.worker")


@dataclass(slots=True)
class _Pin:
    """How to load a model key, to pin or unpin it later."""

    endpoint: str
    model: str
    options: dict[str, object] = field(default_factory=dict)


class Residency:
    """Ollama's resident models as foreman last read them, and foreman's pins on them."""

    def __init__(
        self, upstream: Upstream, outages: Outages, *, pin_keep_alive: object, release_keep_alive: object
    ) -> None:
        self._upstream = upstream
        self._outages = outages
        self.pin_keep_alive = pin_keep_alive
        self.release_keep_alive = release_keep_alive
        self._models: frozenset[str] = frozenset()
        self._due = True  # read /api/ps before the next pick
        # /api/ps names models, not load options: remember which key we loaded each name as.
        self._loaded_as: dict[str, str] = {}
        self._pins: dict[str, _Pin] = {}
        # How to load each model key foreman has loaded, to pin or unpin it later.
        self._known: dict[str, _Pin] = {}

    @property
    def due(self) -> bool:
        """Whether /api/ps must be read again before the next pick."""
        return self._due

    def recheck(self) -> None:
        """What Ollama holds may have changed: read /api/ps again before the next pick."""
        self._due = True

    @property
    def models(self) -> frozenset[str]:
        """The model keys Ollama held at the last read; none while a new read is due."""
        return frozenset() if self._due else self._models

    def as_read(self) -> frozenset[str] | None:
        """The model keys of the last read, or None while a new read is due."""
        return None if self._due else self._models

    async def read(self) -> None:
        """Read /api/ps; UpstreamUnreachable if Ollama does not answer."""
        try:
            names = await self._upstream.resident_models()
        except UpstreamUnreachable as exc:
            self._outages.down(exc)
            raise
        except (UpstreamFailed, UpstreamRejected) as exc:
            # Ollama answers but not with a model list: assume nothing is
            # loaded, which at worst costs a swap that was not needed.
            log.warning("upstream.ps_failed", error=exc.message)
            names = set()
        self._outages.up()
        self._models = frozenset(self._loaded_as.get(name, name) for name in names)
        self._due = False

    async def read_until_answered(self, retry: RetryPolicy, sleep: Sleep) -> None:
        """Read /api/ps, probing with backoff while Ollama does not answer."""
        async for attempt in retry.until_answered(sleep):
            with attempt:
                await self.read()

    async def load(self, job: Job) -> None:
        """Ask Ollama to load the job's model, pinned."""
        options = key_load_options(job.model_key)
        await self._upstream.load(job.endpoint, job.model, options, self.pin_keep_alive)

    def loaded(self, job: Job) -> None:
        """The job's model finished loading, pinned: remember how, and read /api/ps again."""
        key = job.model_key
        self._pins[key] = self._known[key] = _Pin(job.endpoint, job.model, key_load_options(key))
        self._loaded_as[key_model_name(key)] = key
        self._due = True

    def pinned(self, model_key: str) -> bool:
        return model_key in self._pins

    def pinned_models(self) -> frozenset[str]:
        """The model keys foreman keeps loaded with FOREMAN_PIN_KEEP_ALIVE now."""
        return frozenset(self._pins)

    def pin(self, job: Job) -> None:
        """The job's requests carry the pin: more work waits for its model."""
        self._pins[job.model_key] = _Pin(job.endpoint, job.model, key_load_options(job.model_key))

    def release(self, model_key: str) -> bool:
        """The last job of a drain hands Ollama back its expiry; False if the model was not pinned."""
        return self._pins.pop(model_key, None) is not None

    async def make_room(self, keep: str, evict: str | None, waiting: Mapping[str, int]) -> None:
        """Before a load: leave only the policy's victim and idle models without a pin.

        Ollama makes room by evicting an idle model with the shortest
        keep_alive. A released pin (FOREMAN_RELEASE_KEEP_ALIVE) is shorter than
        a pin, so foreman unpins models with no work left and the victim (the
        loaded model with the least waiting work), and pins again any other
        loaded model that still has work but whose last drain had released it.
        """
        for key in sorted(self.models | set(self._pins)):
            if key == keep:
                continue
            pinned = key in self._pins
            left = waiting.get(key, 0)
            if pinned and (key == evict or left == 0):
                pin = self._pins.pop(key)
                keep_alive = self.release_keep_alive
                event, why = "model.unpinned", "make_room" if key == evict else "idle"
            elif not pinned and key != evict and left > 0 and key in self._known:
                pin = self._pins[key] = self._known[key]
                keep_alive = self.pin_keep_alive
                event, why = "model.pinned", "make_room"
            else:
                continue
            await self._upstream.load(pin.endpoint, pin.model, pin.options, keep_alive)
            log.info(event, model=key, keep_alive=keep_alive, reason=why)
