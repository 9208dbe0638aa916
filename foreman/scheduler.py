"""Which model to serve next: the drain-by-model policy, as pure code.

No I/O and no clock: the worker hands in what waits and what Ollama holds,
and gets back the model whose oldest job runs next, with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True, slots=True)
class ModelQueue:
    """What waits for one model key."""

    model_key: str
    waiting: int
    oldest_id: str  # a ULID, so it sorts by arrival


class Reason(StrEnum):
    RESIDENT = "resident"  # the model is loaded: no swap
    DRAINED = "drained"  # loaded models have no work left: swap to the oldest waiting
    COLD = "cold"  # nothing is loaded: load the oldest waiting


@dataclass(frozen=True, slots=True)
class Decision:
    model_key: str
    reason: Reason

    @property
    def swap(self) -> bool:
        """Whether serving this model means asking Ollama to load it."""
        return self.reason is not Reason.RESIDENT


def pick(queues: Iterable[ModelQueue], resident: Set[str]) -> Decision | None:
    """The oldest job for a resident model; only when none is left, the oldest job overall."""
    waiting = [q for q in queues if q.waiting > 0]
    if not waiting:
        return None
    loaded = [q for q in waiting if q.model_key in resident]
    if loaded:
        return Decision(min(loaded, key=_age).model_key, Reason.RESIDENT)
    reason = Reason.DRAINED if resident else Reason.COLD
    return Decision(min(waiting, key=_age).model_key, reason)


def drain_order(queues: Iterable[ModelQueue], resident: Set[str]) -> list[str]:
    """The model keys in the order they will be served if nothing else arrives."""
    remaining = [q for q in queues if q.waiting > 0]
    loaded = set(resident)
    order = []
    while (decision := pick(remaining, loaded)) is not None:
        order.append(decision.model_key)
        remaining = [q for q in remaining if q.model_key != decision.model_key]
        if decision.swap:
            loaded = {decision.model_key}
    return order


def _age(queue: ModelQueue) -> str:
    return queue.oldest_id
