"""Fault injection: make the next requests fail, drop their connection or hang.

Faults are queued FIFO per kind and consumed by the inference requests they apply
to. Where in a request's life each fault strikes:

* **hang** right after validation, before scheduling: no bytes are sent until the
  client gives up or :meth:`Faults.release_hung` / :meth:`Faults.clear` is called
  (then the request carries on normally).
* **fail** after the hang point, before scheduling (so no model is loaded):
  the status and ``{"error": ...}`` go out before any output. With
  ``after_chunks`` set, a streamed request instead sends that many chunks and then
  an ``{"error": ...}`` line with status 200, like a runner failing mid-stream.
* **fail_model** strikes where **fail** does, for every request naming that
  model, until :meth:`Faults.clear`: a model Ollama can never run (a runner
  that crashes on it, weights that do not fit in memory).
* **stall** mid-stream: a streamed request sends ``after_chunks`` lines and then
  nothing, holding its connection open (counted in :attr:`Faults.hung`) until
  released like a hang, as a wedged runner does; then it carries on.
* **drop** after the runner and a slot are acquired (the model loads): the
  stream sends ``after_chunks`` lines and then the connection is aborted without
  finishing the chunked body; ``after_chunks=0`` aborts before the headers.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_ERROR = "llama runner process has terminated: exit status 2"


@dataclass(slots=True)
class Fail:
    """A queued ``fail_next`` fault."""

    remaining: int
    status: int
    error: str
    include_loads: bool
    after_chunks: int | None


@dataclass(slots=True)
class Drop:
    """A queued ``drop_next`` fault."""

    remaining: int
    after_chunks: int
    streamed_only: bool


@dataclass(slots=True)
class Stall:
    """A queued ``stall_next`` fault."""

    remaining: int
    after_chunks: int


class Faults:
    """The fault plan tests drive; see the module docstring for when each strikes."""

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self._fails: collections.deque[Fail] = collections.deque()
        self._drops: collections.deque[Drop] = collections.deque()
        self._hangs = 0
        self._stalls: collections.deque[Stall] = collections.deque()
        self._broken: dict[str, Fail] = {}  # model name -> the failure every request for it meets
        self._release = asyncio.Event()
        self._on_change = on_change or (lambda: None)
        self.hung = 0
        """Requests currently held by a hang fault."""

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        error: str = DEFAULT_ERROR,
        *,
        include_loads: bool = False,
        after_chunks: int | None = None,
    ) -> None:
        """Make the next ``n`` inference requests answer ``status`` with ``{"error": error}``.

        Load/unload short-cuts are skipped unless ``include_loads``. With
        ``after_chunks`` (streamed requests only) the error arrives as an NDJSON
        line after that many chunks, with status 200 already sent.
        """
        if n > 0:
            self._fails.append(Fail(n, status, error, include_loads, after_chunks))

    def fail_model(
        self, model: str, status: int = 500, error: str = DEFAULT_ERROR, *, include_loads: bool = False
    ) -> None:
        """Make every inference request for ``model`` (a normalised name) answer ``status`` with ``{"error": error}``.

        Load requests fail too with ``include_loads``; unload requests never do.
        """
        self._broken[model] = Fail(0, status, error, include_loads, None)

    def drop_next(self, n: int = 1, after_chunks: int = 2, *, streamed_only: bool = True) -> None:
        """Abort the connection of the next ``n`` streamed inference requests.

        ``after_chunks`` lines are sent first; 0 drops before any response bytes.
        With ``streamed_only=False`` non-streamed requests qualify too and are
        dropped before any bytes.
        """
        if n > 0:
            self._drops.append(Drop(n, after_chunks, streamed_only))

    def hang_next(self, n: int = 1) -> None:
        """Hold the next ``n`` inference requests without answering (see module docstring)."""
        self._hangs += max(n, 0)

    def stall_next(self, n: int = 1, after_chunks: int = 1) -> None:
        """Make the next ``n`` streamed inference requests go silent after ``after_chunks`` lines (see module docstring)."""
        if n > 0:
            self._stalls.append(Stall(n, after_chunks))

    def release_hung(self) -> None:
        """Let every request held by a hang fault carry on."""
        self._release.set()
        self._release = asyncio.Event()

    def clear(self) -> None:
        """Forget every queued fault and release hung requests."""
        self._fails.clear()
        self._drops.clear()
        self._stalls.clear()
        self._broken.clear()
        self._hangs = 0
        self.release_hung()

    @property
    def armed(self) -> bool:
        """Whether any fault is still queued."""
        return bool(self._fails or self._drops or self._hangs or self._stalls or self._broken)

    # ------------------------------------------------------ used by handlers

    def take_hang(self, is_load: bool) -> asyncio.Event | None:
        """Consume a hang fault; returns the event whose setting releases it."""
        if self._hangs and not is_load:
            self._hangs -= 1
            return self._release
        return None

    async def hang(self, release: asyncio.Event) -> None:
        """Wait, counted in :attr:`hung`, until ``release`` is set."""
        self.hung += 1
        self._on_change()
        try:
            await release.wait()
        finally:
            self.hung -= 1
            self._on_change()

    def take_fail(self, is_load: bool, model: str | None = None) -> Fail | None:
        """The ``fail_model`` fault of ``model``, else consume one ``fail_next`` fault if the head of the queue applies."""
        broken = self._broken.get(model or "")
        if broken is not None and (broken.include_loads or not is_load):
            return broken
        if not self._fails:
            return None
        head = self._fails[0]
        if is_load and not head.include_loads:
            return None
        head.remaining -= 1
        if head.remaining <= 0:
            self._fails.popleft()
        return head

    def take_stall(self, is_load: bool, streamed: bool) -> tuple[int, asyncio.Event] | None:
        """Consume one ``stall_next`` fault for a streamed request: after how many lines, and its release."""
        if not self._stalls or is_load or not streamed:
            return None
        head = self._stalls[0]
        head.remaining -= 1
        if head.remaining <= 0:
            self._stalls.popleft()
        return head.after_chunks, self._release

    def take_drop(self, is_load: bool, streamed: bool) -> Drop | None:
        """Consume one ``drop_next`` fault if the head of the queue applies."""
        if not self._drops or is_load:
            return None
        head = self._drops[0]
        if head.streamed_only and not streamed:
            return None
        head.remaining -= 1
        if head.remaining <= 0:
            self._drops.popleft()
        return head
