"""The seeded traces: which jobs arrive when, for which model, and how long each runs and loads.

A batch queued at once, Poisson streams with a hot model, interactive bursts
over batch work, two resident slots, a starving stream, aliases, overdue
backlogs beside chats. Every trace is a pure function of its seed, so two runs
are the same run.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from foreman.job import Priority
from foreman.routing.aliases import alias_key, candidates, is_alias_key


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
