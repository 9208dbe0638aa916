"""The scheduling simulator: foreman's own policy on seeded traces, against two baselines.

    python bench/schedule.py                   # the table, the target checks, bench/schedule-timeline.png
    python bench/schedule.py --e2e             # trace 1 again through the real daemon and stub_ollama

The simulated worker is foreman's: one job at a time, a swap is a load that
takes the model's load time, and the pick is `foreman.scheduling.policy.Policy.pick`
driven by the daemon worker's own `foreman.scheduling.driver.PolicyDriver` (its `State`
and `CostBook` bookkeeping).
The clock is simulated, so a two-hour trace takes well under a second.

Baselines, beside it:
- FIFO: the oldest job first, whatever is loaded (Ollama's own queue).
- drain: plain drain-by-model, foreman's core rule: the oldest job of a loaded
  model, else the oldest job overall; no bound, no priorities.
With more than one slot the baselines evict the least recently used model.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import random
import socket
import sqlite3
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import aiohttp

from _harness import until
from _report import machine
from foreman.job import Priority
from foreman.routing.aliases import alias_key, candidates, fold, is_alias_key
from foreman.scheduling.driver import PolicyDriver
from foreman.scheduling.policy import Decision, ModelQueue, Policy, Reason

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------- traces


@dataclass(frozen=True, slots=True)
class SimJob:
    id: str  # sorts by arrival, like a ULID
    model: str
    arrival: float
    run_s: float
    priority: Priority = Priority.BATCH


@dataclass(frozen=True, slots=True)
class Trace:
    name: str
    title: str
    jobs: tuple[SimJob, ...]
    load_s: Mapping[str, float]
    slots: int = 1
    max_wait: float = 600.0

    def lower_bound(self) -> float:
        """No schedule beats this makespan: every run, plus one load per distinct model.

        A job for an alias needs one of its models: if no plain job needs any
        of them, that is at least one more load, of the cheapest of them.
        """
        models = {job.model for job in self.jobs if not is_alias_key(job.model)}
        loads = sum(self.load_s[m] for m in models)
        uncovered = {
            m
            for job in self.jobs
            if is_alias_key(job.model)
            for m in candidates(job.model)
            if m not in models
        }
        if any(not set(candidates(j.model)) & models for j in self.jobs if is_alias_key(j.model)):
            loads += min(self.load_s[m] for m in uncovered)
        return sum(job.run_s for job in self.jobs) + loads


# Load times (2 to 20 s) and mean run times (0.5 to 5 s) of the models the traces use.
LOAD_S = {"phi3": 2.0, "llama3": 8.0, "qwen2": 14.0, "mixtral": 20.0, "gemma2": 5.0, "codellama": 11.0}
RUN_S = {"phi3": 0.8, "llama3": 2.0, "qwen2": 3.0, "mixtral": 4.5, "gemma2": 1.5, "codellama": 3.5}
# An alias either model may serve (README, "Model routing"); its jobs take the mean of their run times.
FAST = alias_key("fast", ["phi3", "llama3"])
RUN_S[FAST] = (RUN_S["phi3"] + RUN_S["llama3"]) / 2


def _run_time(rng: random.Random, model: str) -> float:
    """A job's run time: the model's mean, give or take 40%, kept within 0.5 to 5 s."""
    return min(5.0, max(0.5, RUN_S[model] * rng.uniform(0.6, 1.4)))


def _jobs(items: Iterable[tuple[float, str, float, Priority]]) -> tuple[SimJob, ...]:
    ordered = sorted(items, key=lambda item: item[0])
    return tuple(SimJob(f"{i:07d}", m, t, r, p) for i, (t, m, r, p) in enumerate(ordered))


def trace_batch(seed: int = 1) -> Trace:
    """Trace 1: a batch of 400 jobs over 4 models, interleaved at random, all queued at once."""
    rng = random.Random(seed)
    models = ["phi3", "llama3", "qwen2", "mixtral"]
    names = [models[i % 4] for i in range(400)]
    rng.shuffle(names)
    jobs = tuple(SimJob(f"{i:07d}", m, 0.0, _run_time(rng, m), Priority.BATCH) for i, m in enumerate(names))
    return Trace("1-batch", "400 jobs, 4 models, interleaved", jobs, {m: LOAD_S[m] for m in models})


def _poisson(
    rng: random.Random,
    duration: float,
    rate: float,
    mix: Mapping[str, float],
    priority: Priority,
) -> list[tuple[float, str, float, Priority]]:
    models, weights = list(mix), list(mix.values())
    items = []
    t = rng.expovariate(rate)
    while t < duration:
        model = rng.choices(models, weights)[0]
        items.append((t, model, _run_time(rng, model), priority))
        t += rng.expovariate(rate)
    return items


def _rate_for(load: float, mix: Mapping[str, float]) -> float:
    """Arrivals per second that keep the worker busy running jobs `load` of the time."""
    mean_run = sum(w * RUN_S[m] for m, w in mix.items()) / sum(mix.values())
    return load / mean_run


def trace_hot(seed: int = 2, duration: float = 7200.0) -> Trace:
    """Trace 2: Poisson arrivals, 4 models, 80% load, one hot model with 70% of the traffic."""
    rng = random.Random(seed)
    mix = {"llama3": 0.7, "phi3": 0.1, "qwen2": 0.1, "mixtral": 0.1}
    jobs = _jobs(_poisson(rng, duration, _rate_for(0.8, mix), mix, Priority.BATCH))
    return Trace("2-hot", "Poisson, 80% load, hot model 70%", jobs, {m: LOAD_S[m] for m in mix})


def trace_bursts(seed: int = 3, duration: float = 7200.0) -> Trace:
    """Trace 3: bursts of 1 to 4 interactive chats every few minutes over a steady batch stream."""
    rng = random.Random(seed)
    batch_mix = {"qwen2": 0.5, "mixtral": 0.5}
    items = _poisson(rng, duration, _rate_for(0.6, batch_mix), batch_mix, Priority.BATCH)
    t = rng.expovariate(1 / 180)
    while t < duration:
        model = rng.choice(["phi3", "llama3"])
        for k in range(rng.randint(1, 4)):
            items.append((t + 2.0 * k, model, _run_time(rng, model), Priority.INTERACTIVE))
        t += rng.expovariate(1 / 180)
    models = {*batch_mix, "phi3", "llama3"}
    return Trace(
        "3-bursts", "interactive bursts over a batch stream", _jobs(items), {m: LOAD_S[m] for m in models}
    )


def trace_two_slots(seed: int = 4, duration: float = 7200.0) -> Trace:
    """Trace 4: Poisson arrivals at 80% load over 6 models, with room for two in Ollama."""
    rng = random.Random(seed)
    mix = {"llama3": 0.3, "phi3": 0.25, "gemma2": 0.15, "qwen2": 0.12, "codellama": 0.1, "mixtral": 0.08}
    jobs = _jobs(_poisson(rng, duration, _rate_for(0.8, mix), mix, Priority.BATCH))
    return Trace("4-two-slots", "6 models, 2 resident slots", jobs, {m: LOAD_S[m] for m in mix}, slots=2)


def trace_starve(seed: int = 5, duration: float = 3600.0) -> Trace:
    """Extra trace 5: one model's stream at 100% of capacity, and a job every 5 minutes for 3 others.

    Plain drain-by-model never leaves the hot model while its queue is full:
    this is the starvation the bound exists for.
    """
    rng = random.Random(seed)
    items = _poisson(rng, duration, 1.0 / RUN_S["llama3"], {"llama3": 1.0}, Priority.BATCH)
    for model in ("phi3", "qwen2", "mixtral"):
        items += _poisson(rng, duration, 1 / 300, {model: 1.0}, Priority.BATCH)
    models = ("llama3", "phi3", "qwen2", "mixtral")
    return Trace("5-starve", "hot stream at 100% + others", _jobs(items), {m: LOAD_S[m] for m in models})


def trace_alias(seed: int = 6, duration: float = 7200.0) -> Trace:
    """Trace 6: Poisson arrivals at 80% load over 3 models; half the jobs name the alias fast (phi3 or llama3)."""
    rng = random.Random(seed)
    mix = {FAST: 0.5, "llama3": 0.2, "phi3": 0.1, "qwen2": 0.2}
    jobs = _jobs(_poisson(rng, duration, _rate_for(0.8, mix), mix, Priority.BATCH))
    models = ("phi3", "llama3", "qwen2")
    return Trace("6-alias", "half the jobs name an alias of 2 models", jobs, {m: LOAD_S[m] for m in models})


def served_as(result: Result, name: str) -> Trace:
    """`result`'s trace with every alias job naming the model that served it in `result`."""
    served = {s.job.id: s.model for s in result.served}
    jobs = tuple(replace(job, model=served[job.id] or job.model) for job in result.trace.jobs)
    return replace(result.trace, name=name, jobs=jobs)


def first_models(trace: Trace, name: str) -> Trace:
    """`trace` with every alias job naming the alias's first model, as a static alias would."""
    jobs = tuple(replace(j, model=candidates(j.model)[0]) if is_alias_key(j.model) else j for j in trace.jobs)
    return replace(trace, name=name, jobs=jobs)


def trace_backlogs(seed: int = 6, duration: float = 7200.0, every: float = 900.0) -> Trace:
    """Trace 7: batch backlogs for 3 models dumped every 15 minutes, Poisson interactive chats for 2 others.

    Each backlog is more than the bound (120 s) can absorb, so max_wait
    drains of batch work are under way most of the time; an interactive
    request must not wait for them.
    """
    rng = random.Random(seed)
    items: list[tuple[float, str, float, Priority]] = []
    t = 0.0
    while t < duration:
        for model, count in (("qwen2", 40), ("mixtral", 30), ("codellama", 40)):
            at = t + rng.uniform(0, 60)
            items += [(at, model, _run_time(rng, model), Priority.BATCH) for _ in range(count)]
        t += every
    chat_mix = {"phi3": 0.5, "llama3": 0.5}
    items += _poisson(rng, duration, 1 / 60, chat_mix, Priority.INTERACTIVE)
    models = ("qwen2", "mixtral", "codellama", *chat_mix)
    return Trace(
        "7-backlogs",
        "overdue batch backlogs + interactive chats",
        _jobs(items),
        {m: LOAD_S[m] for m in models},
        max_wait=120.0,
    )


def trace_hot_tight() -> Trace:
    """Trace 2 again with FOREMAN_MAX_WAIT=120, so that the bound binds on it."""
    return replace(trace_hot(), name="2b-hot-w120", title="trace 2 with max_wait 120 s", max_wait=120.0)


TRACES: dict[str, Callable[[], Trace]] = {
    "1": trace_batch,
    "2": trace_hot,
    "2b": trace_hot_tight,
    "3": trace_bursts,
    "4": trace_two_slots,
    "5": trace_starve,
    "6": trace_alias,
    "7": trace_backlogs,
}


# ------------------------------------------------------------------- policies


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


# ------------------------------------------------------------------ simulation


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


# ---------------------------------------------------------------------- checks


def guarantee_violations(result: Result, max_wait: float, min_residency: float = 0.0) -> list[str]:
    """Every job that breaks the documented guarantee (README, "Scheduling"), explained.

    For a job of class C queued at `a` that the policy had not picked by
    `a + max_wait`, among the picks after `a + max_wait`:
    (1) every job picked before it is interactive (when C is batch), or
        belongs to a max_wait drain of class C, or was picked while the model
        loaded last had held Ollama for less than `min_residency`;
    (2) no model other than the job's own began two max_wait drains of class C;
    (3) the job itself was picked for a max_wait drain (or in that residency time).
    """
    violations = []
    served = sorted(result.served, key=lambda s: s.picked)
    load_ends = sorted(load.end for load in result.loads if not load.abandoned)

    def settling(picked: float) -> bool:
        ended = [end for end in load_ends if end <= picked]
        return bool(ended) and picked - ended[-1] < min_residency

    def cuts_in(s: Served, priority: Priority) -> bool:
        return s.job.priority is Priority.INTERACTIVE and priority is Priority.BATCH

    drains = sorted(
        {(s.drain_since, s.served_by, s.job.priority) for s in served if s.drain_since is not None}
    )
    for item in served:
        due = item.job.arrival + max_wait
        if item.picked <= due:
            continue
        what = f"job {item.job.id} ({item.job.model}, waited {item.wait:.1f}s)"
        priority = item.job.priority
        others = [
            s
            for s in served
            if due < s.picked < item.picked
            and not cuts_in(s, priority)
            and not (s.reason is Reason.MAX_WAIT and s.job.priority is priority)
            and not settling(s.picked)
        ]
        if others:
            first = others[0]
            violations.append(f"{what}: {first.job.model} job {first.job.id} ran first by {first.reason}")
        begun = [
            model
            for since, model, drained in drains
            if due < since <= item.picked and model != item.served_by and drained is priority
        ]
        twice = sorted({m for m in begun if begun.count(m) > 1})
        if twice:
            violations.append(f"{what}: {', '.join(twice)} had two max_wait drains first")
        if item.reason is not Reason.MAX_WAIT and not settling(item.picked):
            violations.append(f"{what}: ran by {item.reason}, not in a max_wait drain")
    return violations


def interactive_violations(result: Result) -> list[str]:
    """Every interactive job that waited for batch work begun after it arrived, or for a batch load.

    The interactive bound (README, "Scheduling"): an interactive job waits for
    the job in flight when it came, its own model's load and the interactive
    jobs ahead of it; never for a batch job picked after it arrived, nor for
    a batch model's load.
    """
    violations = []
    for item in result.served:
        if item.job.priority is not Priority.INTERACTIVE:
            continue
        arrival = item.job.arrival
        what = f"interactive job {item.job.id} ({item.job.model}, waited {item.wait:.1f}s)"
        batch = [
            s for s in result.served if s.job.priority is Priority.BATCH and arrival < s.picked < item.picked
        ]
        if batch:
            violations.append(f"{what}: batch job {batch[0].job.id} ({batch[0].job.model}) was picked first")
        loads = [
            load
            for load in result.loads
            if load.priority is Priority.BATCH
            and not load.abandoned
            and load.model != item.served_by
            and load.start < arrival < load.end
        ]
        if loads:
            violations.append(f"{what}: waited for a batch load of {loads[0].model}")
    return violations


def lower_bound_beaten(result: Result) -> bool:
    """A makespan below the lower bound means the simulator lost work or time."""
    return result.makespan < result.trace.lower_bound() - 1e-6


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile by the nearest-rank method (no interpolation)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# --------------------------------------------------------------------- report


def policies(trace: Trace) -> list[Chooser]:
    return [Fifo(), Drain(), Foreman(Policy(max_wait=trace.max_wait))]


def run_all(traces: Iterable[Trace]) -> list[Result]:
    return [simulate(trace, chooser) for trace in traces for chooser in policies(trace)]


def table(results: Sequence[Result]) -> str:
    """The figures per trace and policy, as a Markdown table."""
    head = (
        "| trace | policy | jobs | swaps | loading s | makespan s | lower bound s | class | wait p50 s"
        " | wait p99 s | wait max s |\n|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"
    )
    rows = [head]
    for r in results:
        classes = [p for p in Priority if r.waits(p)]
        for i, priority in enumerate(classes):
            waits = r.waits(priority)
            totals = [
                r.trace.name,
                r.policy,
                str(len(waits)),
                str(r.swaps),
                f"{r.load_time:.0f}",
                f"{r.makespan:.0f}",
                f"{r.trace.lower_bound():.0f}",
            ]
            if i:  # the run's totals once, on its first class row
                totals = ["", "", str(len(waits)), "", "", "", ""]
            stats = [f"{percentile(waits, 50):.1f}", f"{percentile(waits, 99):.1f}", f"{waits[-1]:.1f}"]
            rows.append("| " + " | ".join([*totals, priority.value, *stats]) + " |")
    return "\n".join(rows)


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    measured: str
    wanted: str
    met: bool
    info: bool = False  # reported, not one of the targets


def targets(results: Sequence[Result]) -> list[Target]:
    """The issue's targets, checked on the figures."""
    by = {(r.trace.name, r.policy): r for r in results}
    checks = []
    t1, t1_fifo = by["1-batch", "foreman"], by["1-batch", "fifo"]
    over = t1.makespan / t1.trace.lower_bound() - 1
    over = 0.0 if abs(over) < 1e-9 else over  # equal up to float rounding
    checks.append(Target("trace 1: makespan vs lower bound", f"{over:+.2%}", "within 3%", over <= 0.03))
    ratio = t1_fifo.swaps / t1.swaps
    checks.append(
        Target(
            "trace 1: swaps, FIFO / foreman",
            f"{t1_fifo.swaps}/{t1.swaps} = {ratio:.0f}x",
            ">= 20x",
            ratio >= 20,
        )
    )
    t2, t2_drain = by["2-hot", "foreman"], by["2-hot", "drain"]
    worst = t2.waits()[-1]
    limit = t2.trace.max_wait + t2.longest_stay()
    checks.append(
        Target(
            "trace 2: longest wait vs bound + one drain",
            f"{worst:.0f}s",
            f"<= {t2.trace.max_wait:.0f}s + {t2.longest_stay():.0f}s",
            worst <= limit,
        )
    )
    swaps = t2.swaps / t2_drain.swaps
    checks.append(
        Target(
            "trace 2: swaps vs plain drain-by-model",
            f"{t2.swaps}/{t2_drain.swaps} = {swaps:.2f}x",
            "<= 1.5x",
            swaps <= 1.5,
        )
    )
    t2b, t2b_drain = by["2b-hot-w120", "foreman"], by["2b-hot-w120", "drain"]
    worst, stay = t2b.waits()[-1], t2b.longest_stay()
    checks.append(
        Target(
            "trace 2b: longest wait vs bound + one drain",
            f"{worst:.0f}s",
            f"<= {t2b.trace.max_wait:.0f}s + {stay:.0f}s",
            worst <= t2b.trace.max_wait + stay,
            info=True,
        )
    )
    swaps = t2b.swaps / t2b_drain.swaps
    checks.append(
        Target(
            "trace 2b: swaps vs plain drain-by-model",
            f"{t2b.swaps}/{t2b_drain.swaps} = {swaps:.2f}x",
            "<= 1.5x",
            swaps <= 1.5,
            info=True,
        )
    )
    t3 = by["3-bursts", "foreman"]
    p99 = percentile(t3.waits(Priority.INTERACTIVE), 99)
    # One swap: the slowest load among the models interactive jobs use; one run: the longest job.
    chat_models = {j.model for j in t3.trace.jobs if j.priority is Priority.INTERACTIVE}
    swap = max(t3.trace.load_s[m] for m in chat_models)
    run = max(j.run_s for j in t3.trace.jobs)
    checks.append(
        Target(
            "trace 3: interactive p99 wait vs one swap + one run",
            f"{p99:.1f}s",
            f"< {swap:.0f}s + {run:.1f}s",
            p99 < swap + run,
        )
    )
    t5, t5_drain = by["5-starve", "foreman"], by["5-starve", "drain"]
    worst, limit = t5.waits()[-1], t5.trace.max_wait + t5.longest_stay()
    checks.append(
        Target(
            f"trace 5: longest wait vs bound + one drain (drain-by-model: {t5_drain.waits()[-1]:.0f}s)",
            f"{worst:.0f}s",
            f"<= {t5.trace.max_wait:.0f}s + {t5.longest_stay():.0f}s",
            worst <= limit,
        )
    )
    t6 = by["6-alias", "foreman"]
    policy = Policy(max_wait=t6.trace.max_wait)
    replaced = simulate(served_as(t6, "6-alias-served"), Foreman(policy))
    checks.append(
        Target(
            "trace 6: swaps, aliases vs every alias job naming the model that served it",
            f"{t6.swaps}/{replaced.swaps} = {t6.swaps / replaced.swaps:.2f}x",
            "<= 1x",
            t6.swaps <= replaced.swaps,
        )
    )
    static = simulate(first_models(t6.trace, "6-alias-first"), Foreman(policy))
    checks.append(
        Target(
            "trace 6: swaps, aliases vs every alias job naming its first model (a static alias)",
            f"{t6.swaps}/{static.swaps} = {t6.swaps / static.swaps:.2f}x",
            "< 1x",
            t6.swaps < static.swaps,
            info=True,
        )
    )
    t7, t7_drain = by["7-backlogs", "foreman"], by["7-backlogs", "drain"]
    p99 = percentile(t7.waits(Priority.INTERACTIVE), 99)
    chat_models = {j.model for j in t7.trace.jobs if j.priority is Priority.INTERACTIVE}
    load = max(t7.trace.load_s[m] for m in chat_models)
    run = max(j.run_s for j in t7.trace.jobs)
    before = percentile(t7_drain.waits(Priority.INTERACTIVE), 99)
    checks.append(
        Target(
            f"trace 7: interactive p99 wait vs one job + one load (drain-by-model: {before:.0f}s)",
            f"{p99:.1f}s",
            f"<= {run:.1f}s + {load:.0f}s",
            p99 <= run + load,
        )
    )
    for r in results:
        if r.policy == "foreman":
            broken = guarantee_violations(r, r.trace.max_wait)
            checks.append(
                Target(
                    f"{r.trace.name}: guarantee holds for every job",
                    f"{len(broken)} violations",
                    "0",
                    not broken,
                )
            )
            waited = interactive_violations(r)
            if any(j.priority is Priority.INTERACTIVE for j in r.trace.jobs):
                checks.append(
                    Target(
                        f"{r.trace.name}: no interactive job waits for batch work or a batch load",
                        f"{len(waited)} violations",
                        "0",
                        not waited,
                    )
                )
        if lower_bound_beaten(r):
            checks.append(
                Target(f"{r.trace.name}/{r.policy}: lower bound", f"{r.makespan:.0f}s", "not beaten", False)
            )
    return checks


PANELS = (("1-batch", "fifo"), ("1-batch", "foreman"), ("5-starve", "drain"), ("5-starve", "foreman"))


def plot(results: Sequence[Result], path: Path, panels: Sequence[tuple[str, str]] = PANELS) -> None:
    """Which model is resident over time, one row per Ollama slot, one panel per (trace, policy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    by = {(r.trace.name, r.policy): r for r in results}
    chosen = [by[panel] for panel in panels]
    models = sorted({m for r in chosen for m in r.trace.load_s})
    colours = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(models)}
    fig, axes = plt.subplots(len(chosen), 1, figsize=(11, 1.2 + 1.15 * len(chosen)))
    for ax, r in zip(axes, chosen, strict=True):
        end = max(by[name, policy].makespan for name, policy in panels if name == r.trace.name)
        for i, load in enumerate(r.loads):
            until = r.evicted_at.get(i, r.makespan)
            height = 0.8 / r.trace.slots
            y = load.slot * (1 / r.trace.slots)
            ax.broken_barh([(load.start, until - load.start)], (y, height), color=colours[load.model])
            ax.broken_barh([(load.start, load.end - load.start)], (y, height), color="black", alpha=0.4)
        ax.set_yticks([])
        ax.set_xlim(0, end)
        ax.set_title(
            f"trace {r.trace.name} ({r.trace.title}), {r.policy}: {r.swaps} swaps,"
            f" makespan {r.makespan:.0f} s, longest wait {r.waits()[-1]:.0f} s",
            fontsize=9,
            loc="left",
        )
    axes[-1].set_xlabel("simulated seconds; dark: loading")
    handles = [Rectangle((0, 0), 1, 1, color=colours[m]) for m in models]
    fig.legend(handles, models, loc="lower right", ncol=len(models), fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------- e2e


async def end_to_end(trace: Trace, scale: float) -> tuple[int, list[str]]:
    """Run `trace` through foreman and stub_ollama with every time multiplied by `scale`.

    Returns the swaps foreman made and the models in the order the stub loaded them.
    All jobs are submitted while the stub refuses connections and foreman's
    clock is held, so, as in the trace, they are all queued at time 0 before
    the worker starts.
    """
    import tempfile

    from aiohttp import web

    from foreman.api.keys import WORKER
    from foreman.app import create_app
    from foreman.config import Config
    from stub_ollama import StubModel, StubServer, StubSettings

    token_s = 0.002
    models = tuple(StubModel(f"{m}:latest", load_delay=s * scale) for m, s in trace.load_s.items())
    # Reserve the stub's port with a socket that is bound but not listening:
    # connections are refused, yet no other socket (not even one of the 400
    # client connections below) can take the port before the stub starts on it.
    placeholder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    placeholder.bind(("127.0.0.1", 0))
    port = placeholder.getsockname()[1]
    stub = StubServer(StubSettings(models=models, token_delay=token_s, tokens=64))
    try:
        with tempfile.TemporaryDirectory(prefix="foreman-e2e-") as tmp:
            config = Config(
                db_path=Path(tmp) / "foreman.db",
                upstream=f"http://127.0.0.1:{port}",
                max_wait=trace.max_wait * scale,
                backoff_initial=0.01,
                backoff_max=0.05,
                warm="off",
            )
            clock = HeldClock()
            app = create_app(config, clock=clock)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
            ) as http:
                tasks = []
                for job in trace.jobs:
                    # The stub runs (tokens - 1) token delays.
                    tokens = max(2, round(job.run_s * scale / token_s) + 1)
                    body = {
                        "model": job.model,
                        "prompt": job.id,
                        "stream": False,
                        "options": {"num_predict": tokens},
                    }
                    headers = {"X-Foreman-Priority": job.priority.value}
                    tasks.append(asyncio.create_task(_post(http, url + "/api/generate", body, headers)))
                    await asyncio.sleep(0)
                await _until_queued(config.db_path, len(trace.jobs))
                clock.release()
                await stub.start("127.0.0.1", port)
                placeholder.close()
                statuses = await asyncio.gather(*tasks)
            swaps = app[WORKER].swaps
            await runner.cleanup()
    finally:
        placeholder.close()
        await stub.close()
    if set(statuses) != {200}:
        raise RuntimeError(f"end-to-end run failed: statuses {sorted(set(statuses))}")
    loads = [name.split(":")[0] for name in stub.stub.loads]
    return swaps, loads


class HeldClock:
    """time.time that stands still until `release`, then runs on from where it stood."""

    def __init__(self) -> None:
        self._held: float | None = time.time()
        self._offset = 0.0

    def __call__(self) -> float:
        return self._held if self._held is not None else time.time() - self._offset

    def release(self) -> None:
        if self._held is not None:
            self._offset = time.time() - self._held
            self._held = None


async def _post(
    http: aiohttp.ClientSession, url: str, body: dict[str, object], headers: dict[str, str]
) -> int:
    async with http.post(url, json=body, headers=headers) as response:
        await response.read()
        return response.status


async def _until_queued(db_path: Path, count: int) -> None:
    def queued() -> bool:
        with closing(sqlite3.connect(db_path)) as db:
            return int(db.execute("SELECT count(*) FROM jobs").fetchone()[0]) >= count

    await until(queued, within=100, every=0.005, what="the jobs to be queued")


# ------------------------------------------------------------------------ main


def machine_line() -> str:
    what = machine()
    return f"{what['nproc']} CPUs ({what['cpu']}), Python {what['python']}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--png", type=Path, default=HERE / "schedule-timeline.png", help="timeline to write")
    parser.add_argument("--no-png", action="store_true", help="skip the timeline")
    parser.add_argument("--e2e", action="store_true", help="also run trace 1 through the daemon and stub")
    parser.add_argument("--scale", type=float, default=0.005, help="time scale of the end-to-end run")
    args = parser.parse_args(argv)

    traces = [make() for make in TRACES.values()]
    results = run_all(traces)
    print(f"machine: {machine_line()}\n")
    print(table(results))
    print()
    checks = targets(results)
    for check in checks:
        mark = "ok" if check.met else "info" if check.info else "MISSED"
        against = "compare" if check.info else "target"
        print(f"[{mark}] {check.name}: {check.measured} ({against} {check.wanted})")
    ok = all(check.met or check.info for check in checks)
    if not args.no_png:
        plot(results, args.png)
        print(f"\ntimeline: {args.png}")
    if args.e2e:
        simulated = next(r for r in results if r.trace.name == "1-batch" and r.policy == "foreman")
        from foreman import log

        log.configure("console", "warning")  # the daemon's own job log would drown the report
        swaps, loads = asyncio.run(end_to_end(traces[0], args.scale))
        sim_loads = [load.model for load in simulated.loads]
        same = swaps == simulated.swaps
        print(
            f"\n[{'ok' if same else 'MISSED'}] end-to-end trace 1 at scale {args.scale}:"
            f" daemon {swaps} swaps {loads}, simulator {simulated.swaps} swaps {sim_loads}"
        )
        ok = ok and same
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
