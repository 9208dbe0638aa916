"""What the simulated worker asks before each job: foreman's policy, or one of two baselines.

- foreman: `foreman.scheduling.driver.PolicyDriver`, exactly as the daemon's worker drives it.
- FIFO: the oldest job first, whatever is loaded (Ollama's own queue).
- drain: plain drain-by-model, foreman's core rule: the oldest job of a loaded
  model, else the oldest job overall; no bound, no priorities.

With more than one slot the baselines evict the least recently used model.
"""

from __future__ import annotations

from typing import Protocol

from foreman.scheduling.driver import PolicyDriver
from foreman.scheduling.policy import Decision, ModelQueue, Policy, Reason
from foreman.simulator.traces import Trace


class Chooser(Protocol):
    """What the simulated worker asks at each pick, and tells after claims and loads."""

    name: str

    def choose(self, queues: list[ModelQueue], resident: frozenset[str], now: float) -> Decision | None: ...

    def claimed(self, decision: Decision, now: float) -> None: ...

    def loaded(self, model: str, seconds: float, now: float) -> None: ...

    def ran(self, model: str, seconds: float) -> None: ...

    def abandons(self, loading: Decision, queues: list[ModelQueue], now: float) -> bool: ...

    def abandoned(self, loading: Decision) -> None: ...


class Foreman(PolicyDriver):
    """foreman's policy, driven exactly as the daemon's worker drives it (`foreman.scheduling.driver.PolicyDriver`)."""

    def __init__(self, policy: Policy, name: str = "foreman") -> None:
        super().__init__(policy)
        self.name = name


class _Baseline:
    name = "baseline"

    def claimed(self, decision: Decision, now: float) -> None:
        pass

    def loaded(self, model: str, seconds: float, now: float) -> None:
        pass

    def ran(self, model: str, seconds: float) -> None:
        pass

    def abandons(self, loading: Decision, queues: list[ModelQueue], now: float) -> bool:
        return False

    def abandoned(self, loading: Decision) -> None:
        pass

    @staticmethod
    def _decide(queue: ModelQueue, resident: frozenset[str], reason: Reason) -> Decision:
        swap = queue.model_key not in resident
        return Decision(queue.model_key, reason if swap else Reason.RESIDENT, queue.priority, swap)


class Fifo(_Baseline):
    """The oldest job first, whatever is loaded: what Ollama's own queue does."""

    name = "fifo"

    def choose(self, queues: list[ModelQueue], resident: frozenset[str], now: float) -> Decision | None:
        if not queues:
            return None
        reason = Reason.DRAINED if resident else Reason.COLD
        return self._decide(min(queues, key=lambda q: q.oldest_id), resident, reason)


class Drain(_Baseline):
    """Plain drain-by-model: a loaded model's oldest job, else the oldest job overall."""

    name = "drain"

    def choose(self, queues: list[ModelQueue], resident: frozenset[str], now: float) -> Decision | None:
        if not queues:
            return None
        loaded = [q for q in queues if q.model_key in resident]
        reason = Reason.DRAINED if resident else Reason.COLD
        return self._decide(min(loaded or queues, key=lambda q: q.oldest_id), resident, reason)


def policies(trace: Trace) -> list[Chooser]:
    """The three choosers every trace runs with: FIFO, drain-by-model, and foreman with the trace's bound."""
    return [Fifo(), Drain(), Foreman(Policy(max_wait=trace.max_wait))]
