"""The documented guarantees (README, "Scheduling"), checked job by job on a simulated run.

Each check returns the jobs that break it, explained, so a test or the report
can say which job and why; an empty list means the run kept the guarantee.
"""

from __future__ import annotations

from foreman.job import Priority
from foreman.scheduling.policy import Reason
from foreman.simulator.simulate import Result, Served


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
