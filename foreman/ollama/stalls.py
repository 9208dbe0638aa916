"""A wedged Ollama: requests it accepted and never answers, given up after FOREMAN_STALL_TIMEOUT.

Ollama can hang a generation for hours while `/api/tags` still answers, so
"reachable" says nothing about it. `Upstream` reads every reply with a
deadline on silence (before the first byte, and between two chunks); when it
runs out, the request is aborted (the connection is closed, which Ollama
takes as a client that left) and `UpstreamStalled` goes up to the worker,
which retries the job or fails it if output already reached its client.

This is the count of those stalls, and what foreman does after several in a
row: run the operator's `FOREMAN_OLLAMA_RESTART` command, once per incident
(a run of stalls with no answer between), again only after a backoff that
doubles while the incident lasts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("foreman.ollama")

# How long a restart command may run before foreman stops waiting for it (and kills it).
_RESTART_TIMEOUT_S = 120.0
# The pause before a second restart in one incident; it doubles up to the cap.
_RESTART_BACKOFF_S = 60.0
_RESTART_BACKOFF_MAX_S = 1800.0


class Stalls:
    """Stalls counted since start, the run of them now, and the restart command."""

    def __init__(
        self,
        timeout: float,
        *,
        restart_command: str | None = None,
        restart_after: int = 3,
        on_stall: Callable[[], None] = lambda: None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout = timeout  # 0: never
        self._restart_command = restart_command
        self._restart_after = restart_after
        self._on_stall = on_stall
        self._monotonic = monotonic
        self.total = 0
        self.in_a_row = 0
        self.last: tuple[float, float] | None = None  # (wall-clock time, seconds of silence) of the latest
        self.restarts = 0
        self._next_restart = 0.0  # monotonic: no restart before
        self._backoff = _RESTART_BACKOFF_S
        self._restarting: asyncio.Task[None] | None = None

    def deadline(self, extra: float = 0.0) -> float | None:
        """The silence a request may meet (with `extra` on top, such as a load); None: no limit."""
        return self.timeout + extra if self.timeout > 0 else None

    def stalled(self, seconds: float, what: str) -> None:
        """A request got nothing for `seconds` and was given up (the job and model come from the log context)."""
        self.total += 1
        self.in_a_row += 1
        self.last = (time.time(), seconds)
        self._on_stall()
        # The worker binds the job it runs to the context: named here, in the line itself.
        running = structlog.contextvars.get_contextvars()
        log.warning(
            "ollama.stalled",
            job_id=running.get("job_id"),
            model=running.get("model"),
            seconds=round(seconds, 3),
            request=what,
            in_a_row=self.in_a_row,
            hint="Ollama accepted the request and sent nothing since; foreman aborted it",
        )
        if (
            self._restart_command
            and self.in_a_row >= self._restart_after
            and (self._restarting is None or self._restarting.done())
            and self._monotonic() >= self._next_restart
        ):
            self._next_restart = self._monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, _RESTART_BACKOFF_MAX_S)
            self._restarting = asyncio.get_running_loop().create_task(self._restart(self._restart_command))

    def answered(self) -> None:
        """A reply came through whole: the incident, if there was one, is over."""
        if self.in_a_row:
            self.in_a_row = 0
            self._next_restart = 0.0
            self._backoff = _RESTART_BACKOFF_S

    async def _restart(self, command: str) -> None:
        self.restarts += 1
        log.warning("ollama.restart", command=command, stalls_in_a_row=self.in_a_row)
        started = self._monotonic()
        try:
            process = await asyncio.create_subprocess_shell(
                command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
        except OSError as exc:
            log.error("ollama.restart_failed", command=command, error=str(exc))
            return
        try:
            async with asyncio.timeout(_RESTART_TIMEOUT_S):
                output, _ = await process.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            log.error(
                "ollama.restart_failed",
                command=command,
                error=f"still running after {_RESTART_TIMEOUT_S:g} s",
            )
            return
        tail = output.decode("utf-8", "replace").strip()[-500:]
        took = round(self._monotonic() - started, 3)
        if process.returncode == 0:
            log.info("ollama.restarted", command=command, seconds=took, output=tail)
        else:
            log.error(
                "ollama.restart_failed",
                command=command,
                exit_code=process.returncode,
                seconds=took,
                output=tail,
            )

    async def close(self) -> None:
        if self._restarting is not None and not self._restarting.done():
            self._restarting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restarting
