"""Which models are loaded, and when they load and unload: Ollama's scheduler in miniature.

Modelled on ``server/sched.go``:

* A request for a model that is loaded with the same runner options takes a
  reference on the runner at once (the fast path, which bypasses the queue,
  even while that runner is waiting to be evicted).
* Every other request joins ONE FIFO pending queue, served by one task that
  handles a request at a time and blocks until its model is loaded (head-of-line
  blocking, like ``processPending``). It unloads a runner loaded with other
  options, or evicts a victim when ``capacity`` runners are loaded: idle runners
  first, then the shortest keep-alive, then the least recently used. A busy
  victim is never aborted; the queue waits until its last request ends.
* Runners are reference-counted. When the count drops to zero the keep-alive
  timer starts (``loop.call_later``); keep-alive 0 unloads at once, forever never
  expires by time.
* Each runner has ``num_parallel`` FIFO slots for generation.
* A client that goes away while its load is running aborts the load when no one
  else is waiting for that runner.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("stub_ollama")

RunnerOptions = tuple[tuple[str, object], ...]
"""The load-time options that force a reload when they change (sorted key/value pairs)."""


class QueueFull(Exception):
    """The pending queue holds ``max_queue`` requests already (Ollama's ``ErrMaxQueue``)."""

    def __str__(self) -> str:
        return "server busy, please try again.  maximum pending requests exceeded"


class RunnerGone(Exception):
    """The runner a request was waiting for went away (load aborted or server restart)."""

    def __str__(self) -> str:
        return "model runner has unexpectedly stopped, this may be due to resource limitations"


class Slots:
    """A FIFO counting semaphore: waiters are served strictly in arrival order."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self) -> None:
        """Take a slot, waiting behind earlier waiters if none is free."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            else:
                # The slot was handed over just as we were cancelled: pass it on.
                self.release()
            raise

    def release(self) -> None:
        """Give a slot back, handing it straight to the oldest waiter if any."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


@dataclass(eq=False)
class Runner:
    """One loaded (or loading) model, like Ollama's ``runnerRef``."""

    model: str
    options: RunnerOptions
    keep_alive: float
    slots: Slots
    ready: asyncio.Future[None]
    unloaded: asyncio.Future[None]
    refcount: int = 0
    loading: bool = True
    # Set when the scheduler picked this runner to make room: it unloads as soon as
    # it is idle, whatever keep_alive later requests carry (see module docstring).
    evicting: bool = False
    last_used: float = field(default_factory=time.monotonic)
    expires_at: float | None = None  # wall-clock deadline while the idle timer runs
    timer: asyncio.TimerHandle | None = None
    load_task: asyncio.Task[None] | None = None

    @property
    def idle(self) -> bool:
        """No request holds a reference."""
        return self.refcount <= 0

    def expiry(self) -> float:
        """Wall-clock time the runner will expire, as ``/api/ps`` shows it (inf = forever)."""
        if self.expires_at is not None:
            return self.expires_at
        if math.isinf(self.keep_alive):
            return math.inf
        # Busy or loading: Ollama shows now + session duration.
        return time.time() + self.keep_alive


@dataclass(eq=False)
class _Pending:
    model: str
    options: RunnerOptions
    keep_alive: float | None
    future: asyncio.Future[Runner]


class Scheduler:
    """Loads, shares and unloads runners; see the module docstring for the rules."""

    def __init__(
        self,
        *,
        capacity: int,
        num_parallel: int,
        default_keep_alive: float,
        max_queue: int,
        load_delay: Callable[[str], float],
        on_load: Callable[[str], None],
        on_unload: Callable[[str, str], None],
        on_change: Callable[[], None],
    ) -> None:
        self.capacity = capacity
        self.num_parallel = num_parallel
        self.default_keep_alive = default_keep_alive
        self.max_queue = max_queue
        self._load_delay = load_delay
        self._on_load = on_load
        self._on_unload = on_unload
        self._on_change = on_change
        self.runners: dict[str, Runner] = {}
        self._pending: collections.deque[_Pending] = collections.deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # ----------------------------------------------------------------- queries

    @property
    def pending(self) -> int:
        """Requests waiting in the pending queue (including the one being served)."""
        return sum(1 for p in self._pending if not p.future.done())

    # ------------------------------------------------------------ acquisition

    async def acquire(self, model: str, options: RunnerOptions, keep_alive: float | None) -> Runner:
        """Get a loaded runner for ``model`` with a reference held; :meth:`release` it after.

        Raises :class:`QueueFull` or :class:`RunnerGone`; cancellation is safe at
        any point (a reference taken on our behalf is given back).
        """
        runner = self.runners.get(model)
        if runner is not None and runner.options == options:
            self._use(runner, keep_alive)
        else:
            if self.pending >= self.max_queue:
                raise QueueFull
            future: asyncio.Future[Runner] = asyncio.get_running_loop().create_future()
            self._pending.append(_Pending(model, options, keep_alive, future))
            self._ensure_task()
            self._wakeup.set()
            try:
                runner = await future
            except asyncio.CancelledError:
                # The queue may have handed us a runner just before we were cancelled.
                if future.done() and not future.cancelled() and future.exception() is None:
                    self.release(future.result())
                raise
        try:
            if not runner.ready.done():
                # asyncio.wait never cancels what it waits on, so our cancellation
                # cannot abort a load other requests are waiting for.
                await asyncio.wait([runner.ready])
        except asyncio.CancelledError:
            self.release(runner)
            raise
        if runner.ready.cancelled():
            self.release(runner)
            raise RunnerGone
        return runner

    def release(self, runner: Runner) -> None:
        """Drop a reference taken by :meth:`acquire`; starts the idle timer at zero."""
        runner.refcount -= 1
        runner.last_used = time.monotonic()
        if self.runners.get(runner.model) is not runner or runner.refcount > 0:
            self._on_change()
            return
        if runner.loading:
            # Everyone who wanted this load went away: abort it, like Ollama does
            # when the client disconnects before the model finished loading.
            self._unload(runner, "load aborted")
        elif runner.evicting or runner.keep_alive <= 0:
            self._unload(runner, "evicted" if runner.evicting else "keep_alive 0")
        elif not math.isinf(runner.keep_alive):
            loop = asyncio.get_running_loop()
            runner.timer = loop.call_later(runner.keep_alive, self._expired, runner)
            runner.expires_at = time.time() + runner.keep_alive
        self._on_change()

    def expire(self, model: str) -> None:
        """Unload ``model`` as soon as it is idle (Ollama's ``expireRunner``).

        Sets the runner's keep-alive to 0 rather than marking it for eviction, so a
        later request that carries a keep_alive revives it, as in Ollama.
        """
        runner = self.runners.get(model)
        if runner is None:
            return
        self._cancel_timer(runner)
        runner.keep_alive = 0.0
        runner.expires_at = time.time()
        if runner.idle and not runner.loading:
            self._unload(runner, "unload request")
        self._on_change()

    # ---------------------------------------------------------------- internals

    def _use(self, runner: Runner, keep_alive: float | None) -> None:
        # A request with keep_alive replaces the runner's setting; one without
        # leaves it alone (useLoadedRunner).
        if keep_alive is not None:
            runner.keep_alive = keep_alive
        runner.refcount += 1
        runner.last_used = time.monotonic()
        self._cancel_timer(runner)
        self._on_change()

    @staticmethod
    def _cancel_timer(runner: Runner) -> None:
        if runner.timer is not None:
            runner.timer.cancel()
            runner.timer = None
        runner.expires_at = None

    def _expired(self, runner: Runner) -> None:
        runner.timer = None
        if self.runners.get(runner.model) is runner and runner.idle:
            self._unload(runner, "keep_alive expired")
            self._on_change()

    def _unload(self, runner: Runner, reason: str) -> None:
        if self.runners.get(runner.model) is not runner:
            return
        del self.runners[runner.model]
        self._cancel_timer(runner)
        if runner.load_task is not None and not runner.load_task.done():
            runner.load_task.cancel()
        if not runner.ready.done():
            runner.ready.cancel()
        if not runner.unloaded.done():
            runner.unloaded.set_result(None)
        self._on_unload(runner.model, reason)

    def _ensure_task(self) -> None:
        if self._closed:
            raise RunnerGone
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._process_pending(), name="stub-ollama-pending"
            )

    async def _process_pending(self) -> None:
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            request = self._pending[0]
            try:
                if not request.future.done():
                    await self._serve(request)
            except Exception as exc:  # a bug here must not wedge every later request
                logger.exception("pending queue failed serving %s", request.model)
                if not request.future.done():
                    request.future.set_exception(exc)
            finally:
                if self._pending and self._pending[0] is request:
                    self._pending.popleft()
                self._on_change()

    async def _serve(self, request: _Pending) -> None:
        loop = asyncio.get_running_loop()
        while not request.future.done():
            runner = self.runners.get(request.model)
            if runner is not None and runner.options == request.options:
                self._use(runner, request.keep_alive)
                request.future.set_result(runner)
                return
            if runner is None and len(self.runners) < self.capacity:
                runner = self._start_load(request, loop)
                self._use(runner, request.keep_alive)
                request.future.set_result(runner)
                # One load at a time: the queue waits for this one to finish.
                await asyncio.wait([runner.ready])
                return
            # Either the model is loaded with other runner options (reload) or
            # there is no room: expire a runner and wait until it is gone.
            victim = runner if runner is not None else self._pick_victim()
            victim.evicting = True
            victim.keep_alive = 0.0
            self._cancel_timer(victim)
            victim.expires_at = time.time()
            if victim.idle and not victim.loading:
                self._unload(victim, "evicted")
                self._on_change()
                continue
            self._on_change()
            waits: list[asyncio.Future[Any]] = [victim.unloaded, request.future]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)

    def _pick_victim(self) -> Runner:
        # Idle first, then shortest keep-alive, then least recently used.
        return min(
            self.runners.values(),
            key=lambda r: (not r.idle, r.keep_alive, r.last_used),
        )

    def _start_load(self, request: _Pending, loop: asyncio.AbstractEventLoop) -> Runner:
        keep_alive = request.keep_alive if request.keep_alive is not None else self.default_keep_alive
        runner = Runner(
            model=request.model,
            options=request.options,
            keep_alive=keep_alive,
            slots=Slots(self.num_parallel),
            ready=loop.create_future(),
            unloaded=loop.create_future(),
        )
        self.runners[runner.model] = runner
        self._on_load(runner.model)
        runner.load_task = loop.create_task(self._load(runner), name=f"load {runner.model}")
        return runner

    async def _load(self, runner: Runner) -> None:
        delay = self._load_delay(runner.model)
        if delay > 0:
            await asyncio.sleep(delay)
        runner.loading = False
        if not runner.ready.done():
            runner.ready.set_result(None)
        self._on_change()

    # ----------------------------------------------------------------- resets

    def reset(self) -> None:
        """Forget every runner and pending request, like an Ollama restart."""
        for request in self._pending:
            if not request.future.done():
                request.future.set_exception(RunnerGone())
        self._pending.clear()
        for runner in list(self.runners.values()):
            self._unload(runner, "restart")
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._on_change()

    async def close(self) -> None:
        """Stop the queue task and every timer without recording unloads."""
        self._closed = True
        for request in self._pending:
            if not request.future.done():
                request.future.set_exception(RunnerGone())
        self._pending.clear()
        tasks: list[asyncio.Task[None]] = []
        for runner in self.runners.values():
            self._cancel_timer(runner)
            if runner.load_task is not None and not runner.load_task.done():
                runner.load_task.cancel()
                tasks.append(runner.load_task)
        if self._task is not None:
            self._task.cancel()
            tasks.append(self._task)
            self._task = None
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
