"""What Ollama holds for foreman: the resident models, the pins that keep them, the loads that swap them.

foreman reads `/api/ps` at start, after a swap, after an idle spell, and when
a reply shows Ollama loaded a model behind its back (`recheck`). While a
model has more work waiting, its requests carry `FOREMAN_PIN_KEEP_ALIVE`
(a pin); the last one hands Ollama back its own expiry. No pin outlives its
work: a load sets the expiry the model will have after its drain, a pin is
forgotten only once the request that hands it back was accepted, and
leftovers are released when the queue empties and on SIGTERM
(`release_pins`). Before a load, pins are moved so that Ollama evicts the
model the policy chose (`make_room`).

Every change to the pins is recorded in the database (`Storage.set_pins`),
in the background and coalesced: a kill -9 leaves no SIGTERM to release
them, so the next start reads them back (`restore_pins`), releases those no
waiting work needs and keeps the others until their drain hands them back.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from foreman.dialects import dialect_for
from foreman.errors import UpstreamFailed, UpstreamRejected, UpstreamUnreachable
from foreman.job import MULTIPART_ENDPOINTS, STREAMED_ENDPOINTS, Job
from foreman.ollama.client import Upstream
from foreman.ollama.names import key_load_options, key_model_name
from foreman.ollama.outages import Outages
from foreman.retry import RetryPolicy, Sleep
from foreman.storage import RecordedPin

log = structlog.get_logger("foreman.worker")

# Ollama's keep_alive when OLLAMA_KEEP_ALIVE is unset (envconfig.KeepAlive).
_OLLAMA_DEFAULT_KEEP_ALIVE = "5m"


@dataclass(slots=True)
class _Pin:
    """How to load a model key, to pin or unpin it later."""

    endpoint: str
    model: str
    options: dict[str, object] = field(default_factory=dict)


class PinLedger(Protocol):
    """Where the pins are recorded (`foreman.storage.Storage`)."""

    async def pins(self) -> list[RecordedPin]: ...

    def set_pins(self, pins: Sequence[RecordedPin]) -> Awaitable[None]: ...


class _Pins(dict[str, _Pin]):
    """The pins by model key, which say when they change (so that they are recorded)."""

    def __init__(self, changed: Callable[[], None]) -> None:
        super().__init__()
        self._changed = changed

    def __setitem__(self, key: str, value: _Pin) -> None:
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._changed()

    def pop(self, key: str, *default: Any) -> Any:
        value = super().pop(key, *default)
        self._changed()
        return value

    def clear(self) -> None:
        super().clear()
        self._changed()


@dataclass(frozen=True, slots=True)
class Dispatch:
    """A job's request as it goes to Ollama, with the pin it sets or releases.

    Where the endpoint takes no keep_alive (Ollama's /v1), `keep_alive` is
    not None: a load request sets it first. Call `accepted` once Ollama has
    accepted a request that carries it (the load, or the job's own).
    """

    body: bytes
    keep_alive: object | None
    residency: Residency
    model_key: str
    releases: _Pin | None  # the pin the request hands back: forgotten once accepted, released later if not

    def accepted(self) -> None:
        """Ollama accepted the request: it has applied its keep_alive to the model."""
        self.residency.unpinned(self.model_key, self.releases)


class Residency:
    """Ollama's resident models as foreman last read them, and foreman's pins on them."""

    def __init__(
        self,
        upstream: Upstream,
        outages: Outages,
        *,
        pin_keep_alive: object,
        release_keep_alive: object | None,
        ledger: PinLedger | None = None,
    ) -> None:
        self._upstream = upstream
        self._ledger = ledger
        self._recorded: tuple[RecordedPin, ...] = ()  # what the ledger holds, or is being sent
        self._recording: asyncio.Task[None] | None = None
        self._outages = outages
        self.pin_keep_alive = pin_keep_alive
        self.release_keep_alive = release_keep_alive  # None: Ollama's own default, as learned
        self._server_keep_alive: object | None = None  # Ollama's default, read off a model foreman loaded
        self._learning: str | None = None  # the model key whose load lets Ollama apply its default
        outages.when_back(self._forget_server_keep_alive)
        self._models: frozenset[str] = frozenset()
        self._due = True  # read /api/ps before the next pick
        # /api/ps names models, not load options: remember which key we loaded each name as.
        self._loaded_as: dict[str, str] = {}
        # Models foreman has asked Ollama to hold beyond their own expiry. Each
        # stays here until a request that hands the model back was accepted,
        # so no pin outlives the work it was set for (see release_pins).
        self._pins: dict[str, _Pin] = _Pins(self._record)
        # How to load each model key foreman has loaded, to pin or unpin it later.
        self._known: dict[str, _Pin] = {}

    def _record(self) -> None:
        """The pins changed: have the ledger record them, one write at a time, the latest set winning."""
        if self._ledger is not None and (self._recording is None or self._recording.done()):
            self._recording = asyncio.get_running_loop().create_task(self._write_pins())

    def _pin_records(self) -> tuple[RecordedPin, ...]:
        return tuple(
            RecordedPin(key, pin.endpoint, pin.model, json.dumps(pin.options, sort_keys=True))
            for key, pin in sorted(self._pins.items())
        )

    async def _write_pins(self) -> None:
        assert self._ledger is not None
        while (wanted := self._pin_records()) != self._recorded:
            try:
                await self._ledger.set_pins(wanted)
            except Exception as exc:  # the database is away: the next change, or the flush, tries again
                log.warning("model.pins_unrecorded", error=str(exc))
                return
            self._recorded = wanted

    async def flush_pins(self) -> None:
        """Wait until the ledger holds the pins as they are now (before the store closes)."""
        if self._ledger is None:
            return
        if self._recording is not None:
            await asyncio.gather(self._recording, return_exceptions=True)
        await self._write_pins()

    async def restore_pins(self, waiting: Mapping[str, int]) -> None:
        """At start: take back the pins a stopped daemon recorded, releasing those no waiting work needs.

        After a clean stop there are none (SIGTERM released them); after kill -9,
        a model left pinned would otherwise stay loaded for good. `waiting` is the
        queued jobs per model key: a pinned model with work keeps its pin, which its
        drain hands back as usual.
        """
        if self._ledger is None:
            return
        recorded = await self._ledger.pins()
        self._recorded = tuple(recorded)
        if not recorded:
            return
        for pin in recorded:
            self._pins[pin.model_key] = self._known[pin.model_key] = _Pin(
                pin.endpoint, pin.model, json.loads(pin.options)
            )
        await self.release_pins("left_behind", keep=lambda key: waiting.get(key, 0) > 0)
        if self._pins:
            log.info("model.pins_kept", models=sorted(self._pins), reason="work_waits")
        await self.flush_pins()

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

    async def load(self, job: Job, expected_s: float = 0.0) -> None:
        """Ask Ollama to load the job's model, with the expiry it will have after its drain.

        `expected_s`, what its loads took before, is allowed on top of the stall timeout.

        The jobs pin it while work waits, so a load that is given up or whose
        job fails leaves no pin behind. Until foreman knows Ollama's default,
        it lets Ollama apply it, and reads it off the loaded model (`loaded`).
        """
        key = job.model_key
        options = key_load_options(key)
        learning = self.release_keep_alive is None and self._server_keep_alive is None
        self._learning = key if learning else None
        keep_alive = None if learning else self.release_value()
        if keep_alive in (0, "0", "0s"):
            keep_alive = self.pin_keep_alive  # expiring at once would unload it before its job
            self._pins[key] = self._known[key] = _Pin(job.endpoint, job.model, options)
        await self._upstream.load(job.endpoint, job.model, options, keep_alive, load_s=expected_s)

    async def loaded(self, job: Job) -> None:
        """The job's model finished loading: remember how, learn Ollama's default if due, read /api/ps again."""
        key = job.model_key
        if self._learning == key:
            self._learning = None
            await self._learn_server_keep_alive(key)
        self._known[key] = _Pin(job.endpoint, job.model, key_load_options(key))
        self._loaded_as[key_model_name(key)] = key
        self._due = True

    async def _learn_server_keep_alive(self, key: str) -> None:
        """Read Ollama's default keep_alive off a model it has just loaded without one."""
        try:
            left = await self._upstream.expires_in(key_model_name(key))
        except (UpstreamUnreachable, UpstreamFailed, UpstreamRejected):
            return  # next time
        # Not listed: Ollama unloaded it as soon as the load ended (OLLAMA_KEEP_ALIVE=0).
        # Otherwise the time left falls short of the default by the moments since
        # Ollama set it: rounding up gives back a default of whole seconds.
        learned: object = 0 if left is None else -1 if math.isinf(left) else max(math.ceil(left), 0)
        self._server_keep_alive = learned
        log.info("ollama.keep_alive", default=learned, model=key)

    def _forget_server_keep_alive(self) -> None:
        self._server_keep_alive = None  # a restarted Ollama may have another default

    def release_value(self) -> object:
        """The keep_alive a released model gets: FOREMAN_RELEASE_KEEP_ALIVE, else Ollama's own default."""
        if self.release_keep_alive is not None:
            return self.release_keep_alive
        if self._server_keep_alive is not None:
            return self._server_keep_alive
        return _OLLAMA_DEFAULT_KEEP_ALIVE  # not learned yet: what Ollama uses when OLLAMA_KEEP_ALIVE is unset

    def pinned(self, model_key: str) -> bool:
        return model_key in self._pins

    def pinned_models(self) -> frozenset[str]:
        """The model keys foreman keeps loaded with FOREMAN_PIN_KEEP_ALIVE now."""
        return frozenset(self._pins)

    def pin(self, job: Job, endpoint: str | None = None) -> None:
        """The job's requests carry the pin: more work waits for its model (loaded through `endpoint`, else the job's).

        Recorded before the request goes, so that whatever becomes of it the pin is known.
        """
        key = job.model_key
        self._pins[key] = self._known[key] = _Pin(endpoint or job.endpoint, job.model, key_load_options(key))

    def release(self, model_key: str) -> bool:
        """The last job of a drain hands Ollama back its expiry; False if the model was not pinned."""
        return self._pins.pop(model_key, None) is not None

    def releasing(self, model_key: str) -> _Pin | None:
        """The pin a request that hands `model_key` back releases, if it is pinned; forget it with `unpinned`."""
        return self._pins.get(model_key)

    def dispatch(self, job: Job, waiting_after: int) -> Dispatch:
        """The job's body with the keep_alive that pins its model (more work waits) or hands it back (the last job)."""
        key = job.model_key
        if not job.respond_async and waiting_after == 0 and key not in self._pins:
            return Dispatch(job.body, None, self, key, None)  # nothing to pin, release or ask for: as it came
        dialect = dialect_for(job.endpoint)
        # An upload (a transcription) is never changed: its model is pinned by a load request beside it.
        body = {} if job.endpoint in MULTIPART_ENDPOINTS else json.loads(job.body)
        if _is_unload(job.endpoint, body):
            # The client asked Ollama to unload: do exactly that.
            return Dispatch(job.body, None, self, key, self.releasing(key))
        changed = False
        if job.respond_async and not job.stream and job.endpoint in STREAMED_ENDPOINTS:
            # Nobody holds a connection for the reply: stream it anyway, so the
            # job's events show its output as it is made.
            dialect.ask_stream(body)
            changed = True
        keep_alive: object | None = None
        releases = None
        if waiting_after > 0:
            if dialect.carries_keep_alive:
                body["keep_alive"] = self.pin_keep_alive
                changed = True
            elif key not in self._pins:
                keep_alive = self.pin_keep_alive  # once: the requests that follow leave it alone
            self.pin(job)
        elif (releases := self.releasing(key)) is not None:
            # The last job of this drain hands Ollama back its own expiry.
            if dialect.carries_keep_alive:
                body.setdefault("keep_alive", self.release_value())
                changed = True
            else:
                keep_alive = self.release_value()
        body_bytes = json.dumps(body, separators=(",", ":")).encode() if changed else job.body
        return Dispatch(body_bytes, keep_alive, self, key, releases)

    def batch_keep_alive(self, job: Job, asked: object | None, waiting_after: int) -> object | None:
        """The keep_alive of an embedding batch's call (`asked`: its leader's): the pin while work waits, else the release."""
        if waiting_after > 0:
            self.pin(job, endpoint="/api/embed")  # the batch's call goes to /api/embed
            return self.pin_keep_alive
        if self.release(job.model_key):
            return asked if asked is not None else self.release_keep_alive
        return asked

    def unpinned(self, model_key: str, released: object | None) -> None:
        """A request that hands the model back was accepted: forget the pin, unless a later job pinned it anew."""
        if released is not None and self._pins.get(model_key) is released:
            del self._pins[model_key]

    async def release_pins(self, reason: str, keep: Callable[[str], bool] = lambda key: False) -> None:
        """Hand every model foreman still pins (but those it must `keep`) back to Ollama's expiry.

        A release is a load request, so only models Ollama still holds get
        one: the others have no pin left to release, and would be loaded.
        """
        if not self._pins:
            return
        try:
            await self.read()
        except UpstreamUnreachable:
            self._pins.clear()  # an Ollama that comes back has nothing loaded
            return
        resident = self._models
        for key, pin in sorted(self._pins.items()):
            if keep(key) and key in resident:
                continue
            del self._pins[key]
            if key not in resident:
                continue
            keep_alive = self.release_value()
            try:
                await self._upstream.load(pin.endpoint, pin.model, pin.options, keep_alive)
            except (UpstreamUnreachable, UpstreamFailed, UpstreamRejected) as exc:
                log.warning("model.unpin_failed", model=key, reason=reason, error=exc.message)
                continue
            log.info("model.unpinned", model=key, keep_alive=keep_alive, reason=reason)

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
            if pinned and key not in self.models:
                del self._pins[key]  # gone already; a release would load it again
                continue
            if pinned and (key == evict or left == 0):
                pin = self._pins.pop(key)
                keep_alive = self.release_value()
                event, why = "model.unpinned", "make_room" if key == evict else "idle"
            elif not pinned and key != evict and left > 0 and key in self._known:
                pin = self._pins[key] = self._known[key]
                keep_alive = self.pin_keep_alive
                event, why = "model.pinned", "make_room"
            else:
                continue
            await self._upstream.load(pin.endpoint, pin.model, pin.options, keep_alive)
            log.info(event, model=key, keep_alive=keep_alive, reason=why)

    async def free_memory(self, keep: str, busy: set[str]) -> None:
        """Ollama ran out of memory for `keep`: unload every other model foreman loaded that has no job running.

        `busy` are the model keys with a job running. Ollama frees memory
        only by evicting idle models, and a model pinned by foreman, or
        released with a long keep_alive, may stay; unloading them (keep_alive
        0) gives the retry room. /api/ps is read again before the next pick.
        """
        try:
            names = await self._upstream.resident_models()
        except (UpstreamUnreachable, UpstreamFailed, UpstreamRejected) as exc:
            log.warning("model.unpin_failed", reason="memory", error=exc.message)
            return
        held = {self._loaded_as.get(name, name) for name in names} | set(self._pins)
        for key in sorted(held - busy - {keep}):
            pin = self._pins.pop(key, None) or self._known.get(key)
            if pin is None:
                continue  # loaded by another program: not foreman's to unload
            try:
                await self._upstream.load(pin.endpoint, pin.model, pin.options, 0)
            except (UpstreamUnreachable, UpstreamFailed, UpstreamRejected) as exc:
                log.warning("model.unpin_failed", model=key, reason="memory", error=exc.message)
                continue
            log.info("model.unpinned", model=key, keep_alive=0, reason="memory", for_model=keep)
        self._due = True


def _is_unload(endpoint: str, body: dict[str, object]) -> bool:
    empty = not body.get("messages") if endpoint == "/api/chat" else not body.get("prompt")
    return endpoint in ("/api/chat", "/api/generate") and empty and body.get("keep_alive") in (0, "0")
