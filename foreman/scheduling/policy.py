"""Which model to serve next, as pure code: no I/O, no asyncio, and no clock.

The worker and the simulator (`foreman.simulator`) hand in what waits, what
Ollama holds, the policy's own small state and `now`; they get back the model
(and priority class) whose oldest job runs next, with the reason. Both then
advance the state with `State.after` and feed observed load and run times to a
`CostBook`, so the daemon and the simulator run exactly the same rules.

Jobs put back after a failure carry a not-before time (`Held`): until it
comes they are invisible to the rules below, and then they count again with
their original arrival, so they keep their place.

The rules, in the order they apply (docs/scheduling.md):

1. Priority: every interactive job is picked before any batch job, also in
   the middle of a max_wait drain of batch work (which resumes after them);
   a load begun for batch work is given up when an interactive job arrives
   for another model (`abandons`). The rules below then apply within a class.
2. A max_wait drain in progress runs to its end: the jobs of its class its
   model had queued when the drain began, and nothing that came later.
3. Bounded wait: when a model's oldest job of the class has waited longer than
   `max_wait`, its model is served next (a max_wait drain), unless the model
   loaded last has held Ollama for less than `min_residency`. Among several
   overdue models, the worst wait per second of learned swap cost goes first,
   but a model that already had a max_wait drain while another has been
   overdue waits for it.
4. Residency first: the oldest job of a model Ollama holds; only when none is
   left, the oldest job of the class, which costs a swap.

Several nodes sharing one queue (PostgreSQL) each run this policy for their
own Ollama, and the queue says how many other nodes hold each model
(`ModelQueue.held_elsewhere`). A model another node holds is left to it
unless its waiting work outlasts one more load on every node that holds it
(`worth_joining`), and a swap goes to a model no other node holds before one
that another node serves. Jobs put back because the node running them died
(`ModelQueue.orphaned`) count as overdue: they had their turn already.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from foreman.job import Priority

# What an unlearned model is assumed to cost until the worker has seen one load or run.
DEFAULT_LOAD_S = 10.0
DEFAULT_RUN_S = 1.0


@dataclass(frozen=True, slots=True)
class Held:
    """A queued job put back after a failure of its own: it may not run before `not_before`."""

    job_id: str
    queued_at: float
    not_before: float


@dataclass(frozen=True, slots=True)
class ModelQueue:
    """What waits for one model key in one priority class.

    `waiting` counts the jobs free to run, `oldest_id` and `oldest_at` name
    the oldest of them (meaningless when there is none), and `held` lists the
    jobs put back with a not-before time.
    """

    model_key: str
    priority: Priority
    waiting: int
    oldest_id: str  # a ULID, so it sorts by arrival
    oldest_at: float  # when that job was queued, on the clock `now` comes from
    held: tuple[Held, ...] = ()
    held_elsewhere: int = 0  # other nodes sharing the queue that hold, load or run this model
    orphaned: int = 0  # jobs put back after the node running them died

    @property
    def queued(self) -> int:
        """Every queued job of the group, held ones included."""
        return self.waiting + len(self.held)

    @property
    def first(self) -> tuple[str, float]:
        """(id, queued_at) of the group's oldest job, held or not."""
        jobs = [(h.job_id, h.queued_at) for h in self.held]
        if self.waiting > 0:
            jobs.append((self.oldest_id, self.oldest_at))
        return min(jobs)

    def at(self, now: float) -> ModelQueue | None:
        """The jobs free to run at `now`; held ones whose time has come join in their own place."""
        if not self.held:
            return self if self.waiting > 0 else None
        due = [h for h in self.held if h.not_before <= now]
        if not due:
            return replace(self, held=()) if self.waiting > 0 else None
        oldest = min(due, key=lambda h: h.job_id)
        if self.waiting > 0 and self.oldest_id < oldest.job_id:
            head = (self.oldest_id, self.oldest_at)
        else:
            head = (oldest.job_id, oldest.queued_at)
        free = ModelQueue(self.model_key, self.priority, self.waiting + len(due), *head)
        return replace(free, held_elsewhere=self.held_elsewhere, orphaned=self.orphaned)


def next_due(queues: Iterable[ModelQueue], now: float) -> float | None:
    """When the next held job's time comes, if one is still held at `now`."""
    times = [h.not_before for q in queues for h in q.held if h.not_before > now]
    return min(times, default=None)


class Reason(StrEnum):
    """Why the worker serves the model it picked; for a swap, why it left the loaded one."""

    RESIDENT = "resident"  # a loaded model has work: no swap
    COLD = "cold"  # nothing is loaded
    DRAINED = "drained"  # loaded models have no work left
    MAX_WAIT = "max_wait"  # a job waited longer than the bound
    PRIORITY = "priority"  # an interactive job waits for a model that is not loaded
    ORPHANED = "orphaned"  # jobs whose node died wait (several nodes sharing a queue)
    CLOUD = "cloud"  # a cloud model: the cloud lane runs it at once, nothing loads (worker/cloud_lane.py)


@dataclass(frozen=True, slots=True)
class Drain:
    """A max_wait drain: the `priority` jobs `model_key` had queued at `since`, served before the rest of their class."""

    model_key: str
    since: float
    priority: Priority = Priority.BATCH


@dataclass(frozen=True, slots=True)
class Decision:
    model_key: str
    reason: Reason
    priority: Priority = Priority.INTERACTIVE
    swap: bool = False  # serving it means asking Ollama to load it
    # A loaded model whose pin to release so that Ollama evicts it, and not a
    # busier one, to make room (only for a swap while models are loaded).
    evict: str | None = None
    drain: Drain | None = None  # the max_wait drain this job belongs to
    waited: float = 0.0  # how long the model's oldest job had waited
    # The job to take: the oldest of its group free to run (follows from the rest).
    job_id: str | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class State:
    """What the policy remembers between picks; advance it with `after` and `loaded`."""

    resident: frozenset[str] = frozenset()
    serving: str | None = None  # the model of the latest job started
    loaded_at: float | None = None  # when `serving` finished loading; None if foreman found it loaded
    drain: Drain | None = None
    # When each (model, class)'s latest max_wait drain began: a model drained
    # while another was overdue waits for that one (this keeps the bound exact).
    drained_at: Mapping[tuple[str, Priority], float] = field(default_factory=dict)

    def after(self, decision: Decision, now: float) -> State:
        """The state once a job was claimed per `decision` at `now`."""
        drained_at = _drain_begun(self, decision)
        drain = decision.drain
        if drain is None and _cuts_in(decision, self.drain):
            drain = self.drain  # interactive work cut in; the batch drain resumes after it
        resident = self.resident
        loaded_at = self.loaded_at if decision.model_key == self.serving else None
        if decision.swap:
            resident = (resident - {decision.evict}) | {decision.model_key}
            loaded_at = now  # until `loaded` says when the load really ended
        return State(resident, decision.model_key, loaded_at, drain, drained_at)

    def gave_up(self, loading: Decision) -> State:
        """This state (the one `loading` was decided in) once its load was given up.

        Nothing was loaded and no job claimed, but a max_wait drain the load
        began stays begun: it resumes after the interactive work, with the jobs
        it had, instead of starting over with everything queued meanwhile.
        """
        if loading.drain is None or loading.drain == self.drain:
            return self
        return replace(self, drain=loading.drain, drained_at=_drain_begun(self, loading))

    def loaded(self, model_key: str, now: float) -> State:
        """`model_key` finished loading at `now`: minimum residency counts from here."""
        if model_key != self.serving:
            return self
        return replace(self, resident=self.resident | {model_key}, loaded_at=now)


@dataclass(frozen=True, slots=True)
class Costs:
    """Learned seconds per model; models not seen yet cost the mean of those seen."""

    load_s: Mapping[str, float] = field(default_factory=dict)
    run_s: Mapping[str, float] = field(default_factory=dict)

    def load(self, model_key: str) -> float:
        return _learned(self.load_s, model_key, DEFAULT_LOAD_S)

    def run(self, model_key: str) -> float:
        return _learned(self.run_s, model_key, DEFAULT_RUN_S)


def _cuts_in(decision: Decision, drain: Drain | None) -> bool:
    return (
        drain is not None and decision.priority is Priority.INTERACTIVE and drain.priority is Priority.BATCH
    )


def _drain_begun(state: State, decision: Decision) -> Mapping[tuple[str, Priority], float]:
    drain = decision.drain
    if drain is None or drain == state.drain:
        return state.drained_at
    return {**state.drained_at, (drain.model_key, drain.priority): drain.since}


def _learned(table: Mapping[str, float], key: str, default: float) -> float:
    if key in table:
        return table[key]
    return sum(table.values()) / len(table) if table else default


@dataclass(slots=True)
class Observed:
    """Running means of one model's load and run times."""

    loads: int = 0
    mean_load_s: float = 0.0
    last_load_s: float = 0.0
    runs: int = 0
    mean_run_s: float = 0.0


class CostBook:
    """Load times from swaps and run times from finished jobs, per model key."""

    def __init__(self) -> None:
        self._seen: dict[str, Observed] = {}

    def record_load(self, model_key: str, seconds: float) -> None:
        seen = self._seen.setdefault(model_key, Observed())
        seen.loads += 1
        seen.mean_load_s += (seconds - seen.mean_load_s) / seen.loads
        seen.last_load_s = seconds

    def record_run(self, model_key: str, seconds: float) -> None:
        seen = self._seen.setdefault(model_key, Observed())
        seen.runs += 1
        seen.mean_run_s += (seconds - seen.mean_run_s) / seen.runs

    def costs(self) -> Costs:
        return Costs(
            {k: s.mean_load_s for k, s in self._seen.items() if s.loads},
            {k: s.mean_run_s for k, s in self._seen.items() if s.runs},
        )

    def observed(self) -> dict[str, Observed]:
        return {k: replace(s) for k, s in self._seen.items()}


@dataclass(frozen=True, slots=True)
class _Work:
    """Everything free to run for one model, by class."""

    model_key: str
    queues: Mapping[Priority, ModelQueue]

    @property
    def waiting(self) -> int:
        return sum(q.waiting for q in self.queues.values())

    @property
    def held_elsewhere(self) -> int:
        return max(q.held_elsewhere for q in self.queues.values())

    @property
    def orphaned(self) -> int:
        return sum(q.orphaned for q in self.queues.values())

    def oldest_at(self) -> float:
        return min(q.oldest_at for q in self.queues.values())


NO_COSTS = Costs()


@dataclass(frozen=True, slots=True)
class Policy:
    """The scheduling rules and their two knobs, in seconds (see the module docstring)."""

    max_wait: float = 600.0
    min_residency: float = 0.0

    def pick(
        self, queues: Iterable[ModelQueue], state: State, now: float, costs: Costs = NO_COSTS
    ) -> Decision | None:
        """The next job's model and class, or None when nothing is free to run at `now`."""
        work = _by_model(queues, now)
        # What other nodes hold stays theirs unless one more node is worth its load.
        work = {k: w for k, w in work.items() if k in state.resident or w.orphaned or worth_joining(w, costs)}
        for priority in Priority:  # interactive first
            in_class = {key: w.queues[priority] for key, w in work.items() if priority in w.queues}
            if in_class:
                return self._pick_in(in_class, priority, state, work, now, costs)
        return None

    def _pick_in(
        self,
        in_class: Mapping[str, ModelQueue],
        priority: Priority,
        state: State,
        work: Mapping[str, _Work],
        now: float,
        costs: Costs,
    ) -> Decision:
        """Rules 2 to 4 within one class."""
        drain = state.drain
        if drain is not None and drain.priority is priority:
            queue = in_class.get(drain.model_key)
            if queue is not None and queue.oldest_at <= drain.since:
                return self._decide(queue, Reason.MAX_WAIT, state, work, now, costs, drain)
        # Work whose node died had its turn already: it goes next, as if overdue.
        overdue = [q for q in in_class.values() if now - q.oldest_at > self.max_wait or q.orphaned]
        if overdue:
            serving = in_class.get(state.serving or "")
            if serving is not None and serving not in overdue and self._settling(state, now):
                # Nothing else may take the worker either, or the overdue job would slip further.
                return self._decide(serving, Reason.RESIDENT, state, work, now, costs)
            # max() keeps the first of equals: on a tie, the model whose job came first.
            chosen = max(
                sorted(_eligible(overdue, state, self.max_wait), key=_age),
                key=lambda q: self._urgency(q, state, now, costs),
            )
            began = Drain(chosen.model_key, now, priority)
            late = now - chosen.oldest_at > self.max_wait
            reason = Reason.MAX_WAIT if late or not chosen.orphaned else Reason.ORPHANED
            return self._decide(chosen, reason, state, work, now, costs, began)
        loaded = [q for q in in_class.values() if q.model_key in state.resident]
        if loaded:
            return self._decide(min(loaded, key=_age), Reason.RESIDENT, state, work, now, costs)
        # A model no other node holds before one this node would only help with.
        unheld = [q for q in in_class.values() if not q.held_elsewhere] or list(in_class.values())
        return self._decide(min(unheld, key=_age), _leaving(state, work), state, work, now, costs)

    @staticmethod
    def may_abandon(loading: Decision) -> bool:
        """Whether a load begun for `loading` could ever be given up (see `abandons`)."""
        return loading.swap and loading.priority is Priority.BATCH

    def abandons(
        self,
        loading: Decision,
        queues: Iterable[ModelQueue],
        state: State,
        now: float,
        costs: Costs = NO_COSTS,
    ) -> bool:
        """Whether to give up the load `loading` started: an interactive job now waits elsewhere.

        Every load for batch work is given up then, a max_wait drain's too
        (the drain resumes after the interactive work, see `State.gave_up`),
        so an interactive job never waits for a batch model's load. `state`
        is the one `loading` was decided in; `queues` what waits now.
        """
        if not self.may_abandon(loading):
            return False
        decision = self.pick(queues, state, now, costs)
        return (
            decision is not None
            and decision.priority is Priority.INTERACTIVE
            and decision.model_key != loading.model_key
        )

    def upcoming(
        self, queues: Iterable[ModelQueue], state: State, now: float, costs: Costs = NO_COSTS
    ) -> str | None:
        """The model the worker will load next, once the loaded models run out of work."""
        elsewhere = [q for q in queues if q.model_key not in state.resident]
        decision = self.pick(elsewhere, replace(state, drain=None), now, costs)
        return decision.model_key if decision is not None else None

    def _settling(self, state: State, now: float) -> bool:
        """The model loaded last still holds Ollama, for less than the minimum residency so far."""
        return (
            state.serving in state.resident
            and state.loaded_at is not None
            and now - state.loaded_at < self.min_residency
        )

    @staticmethod
    def _urgency(queue: ModelQueue, state: State, now: float, costs: Costs) -> float:
        """Seconds waited per second of swap cost; a loaded model costs no swap."""
        if queue.model_key in state.resident:
            return math.inf
        return (now - queue.oldest_at) / max(costs.load(queue.model_key), 1e-3)

    @staticmethod
    def _decide(
        queue: ModelQueue,
        reason: Reason,
        state: State,
        work: Mapping[str, _Work],
        now: float,
        costs: Costs,
        drain: Drain | None = None,
    ) -> Decision:
        key = queue.model_key
        swap = key not in state.resident
        evict = _victim(state.resident, work, costs) if swap and state.resident else None
        waited = now - work[key].oldest_at()
        return Decision(key, reason, queue.priority, swap, evict, drain, waited, queue.oldest_id)


def worth_joining(work: _Work, costs: Costs) -> bool:
    """Whether loading a model other nodes already hold pays: its waiting work outlasts a load on each.

    With h nodes on it, the work left takes waiting x run / h; one more node
    shortens that only if it is longer than the load it has to pay first.
    """
    held = work.held_elsewhere
    return held == 0 or work.waiting * costs.run(work.model_key) > held * costs.load(work.model_key)


def _by_model(queues: Iterable[ModelQueue], now: float) -> dict[str, _Work]:
    """What is free to run at `now`, per model."""
    grouped: dict[str, dict[Priority, ModelQueue]] = {}
    for queue in queues:
        free = queue.at(now)
        if free is not None:
            grouped.setdefault(queue.model_key, {})[queue.priority] = free
    return {key: _Work(key, by_class) for key, by_class in grouped.items()}


def _eligible(overdue: list[ModelQueue], state: State, max_wait: float) -> list[ModelQueue]:
    """Overdue models that have not had a max_wait drain since another one became overdue.

    The model overdue longest always qualifies (its jobs all came after its
    last drain began), so the list is never empty.
    """
    since = {q.model_key: q.oldest_at + max_wait for q in overdue}
    first_overdue = min(since.values())
    return [
        q for q in overdue if state.drained_at.get((q.model_key, q.priority), -math.inf) <= first_overdue
    ] or overdue


def _leaving(state: State, work: Mapping[str, _Work]) -> Reason:
    """Why a swap leaves the loaded models: nothing loaded, nothing left for them, or priority."""
    if not state.resident:
        return Reason.COLD
    if any(key in work for key in state.resident):
        return Reason.PRIORITY
    return Reason.DRAINED


def _victim(resident: frozenset[str], work: Mapping[str, _Work], costs: Costs) -> str:
    """The loaded model with the least waiting work (seconds of learned run time); cheapest reload on ties."""

    def waiting_work(key: str) -> tuple[float, float, str]:
        waiting = work[key].waiting if key in work else 0
        return waiting * costs.run(key), costs.load(key), key

    return min(resident, key=waiting_work)


def drain_order(
    policy: Policy, queues: Iterable[ModelQueue], state: State, now: float, costs: Costs = NO_COSTS
) -> list[tuple[str, Priority]]:
    """The (model, class) queues in the order `policy` serves them if nothing else arrives by `now`.

    Held jobs count as free to run: they keep their place in the order. As if
    this node served them all: what other nodes hold is counted in, so every queue has a place.
    """
    remaining = [replace(_released(q), held_elsewhere=0) for q in queues if q.queued > 0]
    order = []
    while (decision := policy.pick(remaining, state, now, costs)) is not None:
        group = (decision.model_key, decision.priority)
        order.append(group)
        remaining = [q for q in remaining if (q.model_key, q.priority) != group]
        state = replace(state.after(decision, now), drain=None)
    return order


def waiting_before(
    queues: Iterable[ModelQueue], group: tuple[str, Priority], order: Iterable[tuple[str, Priority]]
) -> int:
    """The queued jobs of the groups that drain before `group` when the queue drains in `order`."""
    waiting = {(q.model_key, q.priority): q.waiting for q in queues}
    before = 0
    for ahead in order:
        if ahead == group:
            break
        before += waiting[ahead]
    return before


def _released(queue: ModelQueue) -> ModelQueue:
    """The queue with its held jobs free to run."""
    if not queue.held:
        return queue
    oldest_id, oldest_at = queue.first
    return ModelQueue(queue.model_key, queue.priority, queue.queued, oldest_id, oldest_at)


def _age(queue: ModelQueue) -> str:
    return queue.oldest_id
