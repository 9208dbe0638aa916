"""The policy with its memory: what the worker and the simulator (`foreman.simulator`) both run.

`scheduler.Policy` decides from a snapshot and keeps nothing. `PolicyDriver`
keeps what it needs between picks, the `State` (and the one the latest claim
was decided in, to go back to when a load is given up) and the `CostBook` of
observed load and run times, and advances them as jobs are claimed, models
load and jobs run. Like the policy it does no I/O and never reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from foreman.job import ModelStats, Priority
from foreman.scheduling.policy import CostBook, Costs, Decision, ModelQueue, Policy, State, drain_order


@dataclass(frozen=True, slots=True)
class Choice:
    """The policy with its state and costs frozen at one moment: safe to run on another thread."""

    policy: Policy
    state: State
    now: float
    costs: Costs

    def pick(self, queues: list[ModelQueue]) -> Decision | None:
        return self.policy.pick(queues, self.state, self.now, self.costs)

    def upcoming_after(self, queues: list[ModelQueue], decision: Decision) -> str | None:
        """The model to load once `decision`'s model runs out of work (it counts as loaded)."""
        return self.policy.upcoming(queues, self.state.after(decision, self.now), self.now, self.costs)

    def drain_order(self, queues: list[ModelQueue]) -> list[tuple[str, Priority]]:
        """The (model, class) queues in the order they will be served if nothing else arrives."""
        return drain_order(self.policy, queues, self.state, self.now, self.costs)


class PolicyDriver:
    """Runs `policy` pick after pick, keeping its state and learned costs."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.state = State()
        self.before = self.state  # the state the latest claim was decided in
        self.book = CostBook()

    def choice(self, resident: frozenset[str], now: float) -> Choice:
        """The pick as things stand, with `resident` what Ollama holds; advance with `claimed`."""
        self.state = replace(self.state, resident=resident)
        return Choice(self.policy, self.state, now, self.book.costs())

    def choose(self, queues: list[ModelQueue], resident: frozenset[str], now: float) -> Decision | None:
        """Pick here and now (the simulator's way; the worker's pick runs inside the store's claim)."""
        return self.choice(resident, now).pick(queues)

    def claimed(self, decision: Decision, now: float) -> None:
        """A job was taken per `decision` at `now`."""
        self.before, self.state = self.state, self.state.after(decision, now)

    def abandons(self, loading: Decision, queues: list[ModelQueue], now: float) -> bool:
        """Whether to give up the load begun for `loading`, given what waits now (`Policy.abandons`)."""
        return self.policy.abandons(loading, queues, self.before, now, self.book.costs())

    def abandoned(self, loading: Decision) -> None:
        """The load begun for `loading` was given up: back to the state the claim was decided in.

        A max_wait drain the load began stays begun (`State.gave_up`).
        """
        self.state = self.before.gave_up(loading)

    def loaded(self, model_key: str, seconds: float, now: float) -> None:
        """`model_key` finished loading at `now` after `seconds`."""
        self.book.record_load(model_key, seconds)
        self.state = self.state.loaded(model_key, now)

    def ran(self, model_key: str, seconds: float) -> None:
        """A job of `model_key` ran for `seconds`."""
        self.book.record_run(model_key, seconds)

    def upcoming(self, queues: Iterable[ModelQueue], resident: frozenset[str], now: float) -> str | None:
        """The model to load next, once the loaded ones run out of work."""
        state = replace(self.state, resident=resident)
        return self.policy.upcoming(queues, state, now, self.book.costs())

    def frozen(self, resident: frozenset[str], now: float) -> Choice:
        """The policy as things stand, without advancing anything: for drain orders and positions."""
        return Choice(self.policy, replace(self.state, resident=resident), now, self.book.costs())

    def stats(self, resident: frozenset[str], pinned: frozenset[str] = frozenset()) -> list[ModelStats]:
        """Per model: residency (`resident`, `pinned`), scheduling state and learned costs, for /status."""
        observed = self.book.observed()
        state = self.state
        keys = set(observed) | resident | ({state.serving} if state.serving else set())
        stats = []
        for key in sorted(keys):
            seen = observed.get(key)
            stats.append(
                ModelStats(
                    model_key=key,
                    resident=key in resident,
                    serving=key == state.serving,
                    draining=state.drain is not None and state.drain.model_key == key,
                    pinned=key in pinned,
                    loads=seen.loads if seen else 0,
                    mean_load_s=seen.mean_load_s if seen and seen.loads else None,
                    last_load_s=seen.last_load_s if seen and seen.loads else None,
                    runs=seen.runs if seen else 0,
                    mean_run_s=seen.mean_run_s if seen and seen.runs else None,
                )
            )
        return stats
