"""The simulated worker: one job at a time on a simulated clock, loads that take the model's load time.

Before each pick it folds alias queues as the daemon's worker does
(`foreman.routing.aliases.fold`), asks the chooser, and during a load lets the
chooser give it up for work that arrives meanwhile (`Policy.abandons`). Every
job served, every load and every eviction is kept in the `Result`, for the
checks (`foreman.simulator.checks`) and the report (`bench/schedule.py`).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from foreman.job import Priority
from foreman.routing.aliases import fold
from foreman.scheduling.policy import Decision, ModelQueue, Reason
from foreman.simulator.choosers import Chooser, policies
from foreman.simulator.traces import SimJob, Trace


@dataclass(frozen=True, slots=True)
class Served:
    job: SimJob
    picked: float  # when the policy chose it; before `start` by the load when it cost a swap
    start: float
    end: float
    reason: Reason  # why the pick chose this job's model
    swap: bool  # the pick cost a load
    drain_since: float | None  # the max_wait drain it belonged to, by start time
    model: str | None = None  # the model that served it, when that is not the job's own (an alias's)

    @property
    def served_by(self) -> str:
        return self.model or self.job.model

    @property
    def wait(self) -> float:
        return self.start - self.job.arrival


@dataclass(frozen=True, slots=True)
class Load:
    model: str
    start: float
    end: float
    reason: Reason
    slot: int
    priority: Priority = Priority.BATCH  # the class of the job it was begun for
    abandoned: bool = False  # given up for an interactive job; `end` is when


@dataclass
class Result:
    policy: str
    trace: Trace
    served: list[Served] = field(default_factory=list)
    loads: list[Load] = field(default_factory=list)
    evicted_at: dict[int, float] = field(default_factory=dict)  # load index → when it left

    @property
    def swaps(self) -> int:
        return len(self.loads)

    @property
    def load_time(self) -> float:
        """Seconds spent loading models."""
        return sum(load.end - load.start for load in self.loads)

    @property
    def makespan(self) -> float:
        return max(s.end for s in self.served) - min(j.arrival for j in self.trace.jobs)

    def waits(self, priority: Priority | None = None) -> list[float]:
        return sorted(s.wait for s in self.served if priority is None or s.job.priority is priority)

    def longest_stay(self) -> float:
        """The longest time the worker stayed with one model: a load and the jobs run after it."""
        starts = [*sorted(load.start for load in self.loads), max(s.end for s in self.served)]
        return max(b - a for a, b in itertools.pairwise(starts))


def simulate(trace: Trace, chooser: Chooser) -> Result:
    """Run `trace` through one simulated worker that asks `chooser` before every job."""
    result = Result(chooser.name, trace)
    pending: dict[tuple[str, Priority], deque[SimJob]] = {}
    resident: dict[str, int] = {}  # model → index of its load in result.loads
    last_used: dict[str, float] = {}
    arrivals = deque(sorted(trace.jobs, key=lambda j: (j.arrival, j.id)))

    def admit(job: SimJob) -> None:
        pending.setdefault((job.model, job.priority), deque()).append(job)

    def queues() -> list[ModelQueue]:
        return [
            ModelQueue(model, priority, len(jobs), jobs[0].id, jobs[0].arrival)
            for (model, priority), jobs in pending.items()
            if jobs
        ]

    now = 0.0
    while arrivals or any(pending.values()):
        while arrivals and arrivals[0].arrival <= now:
            admit(arrivals.popleft())
        # Alias jobs count with the model that would serve them now, as in the daemon's worker.
        folded = fold(queues(), frozenset(resident))
        decision = chooser.choose(folded.queues, frozenset(resident), now)
        if decision is None:
            now = arrivals[0].arrival
            continue
        source = folded.source(decision.model_key, decision.priority)
        job = pending[source, decision.priority].popleft()
        model = decision.model_key
        chooser.claimed(decision, now)
        picked = now
        if decision.swap:
            index = _start_load(trace, result, resident, last_used, decision, now)
            ready = result.loads[index].end
            # Jobs that arrive during the load may make the policy give it up (Policy.abandons).
            while arrivals and arrivals[0].arrival < ready:
                arrival = arrivals.popleft()
                admit(arrival)
                if chooser.abandons(decision, fold(queues(), frozenset(resident)).queues, arrival.arrival):
                    ready = math.nan
                    now = arrival.arrival
                    break
            if math.isnan(ready):
                result.loads[index] = replace(result.loads[index], end=now, abandoned=True)
                result.evicted_at[index] = now
                del resident[decision.model_key]
                pending[source, decision.priority].appendleft(job)
                chooser.abandoned(decision)
                continue
            now = ready
            chooser.loaded(model, trace.load_s[model], now)
        drain = decision.drain.since if decision.drain is not None else None
        by = model if model != job.model else None
        result.served.append(
            Served(job, picked, now, now + job.run_s, decision.reason, decision.swap, drain, by)
        )
        now += job.run_s
        last_used[model] = now
        chooser.ran(model, job.run_s)
    return result


def _start_load(
    trace: Trace,
    result: Result,
    resident: dict[str, int],
    last_used: dict[str, float],
    decision: Decision,
    now: float,
) -> int:
    """Make room if every slot is taken (the policy's victim, else the least recently used), start loading."""
    slots = {result.loads[i].slot for i in resident.values()}
    if len(resident) >= trace.slots:
        victim = decision.evict if decision.evict in resident else min(resident, key=lambda m: last_used[m])
        index = resident.pop(victim)
        result.evicted_at[index] = now
        slots.discard(result.loads[index].slot)
    slot = min(set(range(trace.slots)) - slots)
    resident[decision.model_key] = len(result.loads)
    end = now + trace.load_s[decision.model_key]
    result.loads.append(Load(decision.model_key, now, end, decision.reason, slot, decision.priority))
    return len(result.loads) - 1


def run_all(traces: Iterable[Trace]) -> list[Result]:
    """Every trace with every chooser of `policies`, in that order."""
    return [simulate(trace, chooser) for trace in traces for chooser in policies(trace)]


def served_as(result: Result, name: str) -> Trace:
    """`result`'s trace with every alias job naming the model that served it in `result`."""
    served = {s.job.id: s.model for s in result.served}
    jobs = tuple(replace(job, model=served[job.id] or job.model) for job in result.trace.jobs)
    return replace(result.trace, name=name, jobs=jobs)
