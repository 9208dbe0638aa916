"""How long to wait before trying Ollama again: one formula, used two ways.

The worker backs off with `RetryPolicy.delay` after a job met a transient
failure, and probes an Ollama that went away with `until_answered`, a tenacity
loop built on the same formula. Sleep is injected so tests never wait.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from foreman.errors import UpstreamUnreachable

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    # No defaults here: they are Config's (FOREMAN_MAX_ATTEMPTS, _BACKOFF_INITIAL, _BACKOFF_MAX).
    max_attempts: int
    initial: float  # seconds before the second try
    maximum: float  # the longest single wait
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after the `attempt`-th consecutive failure.

        Doubles from `initial` up to `maximum`; the jitter keeps each wait in
        the upper half of its step, so several waiters spread out without any
        of them hammering Ollama the moment it comes back.
        """
        step = min(self.maximum, self.initial * 2.0 ** max(0, attempt - 1))
        return step / 2 + self.rng.uniform(0, step / 2)

    def until_answered(self, sleep: Sleep) -> AsyncRetrying:
        """Retry forever while Ollama is unreachable, backing off per `delay`."""

        def wait(state: RetryCallState) -> float:
            return self.delay(state.attempt_number)

        return AsyncRetrying(
            retry=retry_if_exception_type(UpstreamUnreachable),
            wait=wait,
            sleep=sleep,
            reraise=True,
        )
