"""The simulator itself (`foreman.simulator`): deterministic, never better than the lower bound, checks that can fail.

tests/bench/test_scripts.py runs trace 1 through the real daemon and compares its swaps with the simulator's.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from foreman.routing.aliases import candidates, is_alias_key
from foreman.scheduling.policy import Policy, Reason
from foreman.simulator.checks import guarantee_violations, interactive_violations, lower_bound_beaten
from foreman.simulator.choosers import Foreman
from foreman.simulator.simulate import Result, Served, run_all, served_as, simulate
from foreman.simulator.traces import TRACES


@pytest.fixture(scope="module")
def results() -> list[Result]:
    return run_all(make() for make in TRACES.values())


def test_no_policy_beats_the_lower_bound_on_any_trace(results: list[Result]) -> None:
    """Every run's makespan is at least all run time plus one load per distinct model."""
    assert [(r.trace.name, r.policy) for r in results if lower_bound_beaten(r)] == []
    assert all(len(r.served) == len(r.trace.jobs) for r in results)


def test_the_lower_bound_check_can_fail(results: list[Result]) -> None:
    """A run that claims to finish too early (lost work) is flagged."""
    honest = next(r for r in results if r.trace.name == "1-batch" and r.policy == "foreman")
    lossy = Result(honest.policy, honest.trace, honest.served[:-50], honest.loads)
    assert lower_bound_beaten(lossy)
    squeezed = [replace(s, end=s.end / 2) for s in honest.served]
    assert lower_bound_beaten(Result(honest.policy, honest.trace, squeezed, honest.loads))


def test_foreman_keeps_the_documented_guarantee_on_every_trace(results: list[Result]) -> None:
    """The job-by-job guarantee check finds no violation for foreman's policy."""
    for r in results:
        if r.policy == "foreman":
            assert guarantee_violations(r, r.trace.max_wait) == [], r.trace.name


def test_the_guarantee_check_can_fail(results: list[Result]) -> None:
    """A job picked late by a drained swap while overdue is reported."""
    honest = next(r for r in results if r.trace.name == "5-starve" and r.policy == "foreman")
    bent = [replace(s, reason=Reason.DRAINED) if s.reason is Reason.MAX_WAIT else s for s in honest.served]
    assert guarantee_violations(Result("bent", honest.trace, bent, honest.loads), honest.trace.max_wait)
    late = Served(honest.served[0].job, 10_000, 10_000, 10_001, Reason.RESIDENT, False, None)
    assert guarantee_violations(Result("late", honest.trace, [late], []), 600)


def test_no_interactive_job_waits_for_batch_work_on_any_trace(results: list[Result]) -> None:
    """The interactive bound's check finds no interactive job behind batch work or a batch load."""
    for r in results:
        if r.policy == "foreman":
            assert interactive_violations(r) == [], r.trace.name


def test_the_interactive_check_can_fail(results: list[Result]) -> None:
    """Plain drain-by-model on trace 7 makes chats wait for the batch backlogs, and the check says so."""
    plain = next(r for r in results if r.trace.name == "7-backlogs" and r.policy == "drain")
    assert len(interactive_violations(plain)) > 50


def test_simulation_is_deterministic() -> None:
    """Seeded traces: two runs serve every job at the same times, with the same loads."""
    first = run_all([TRACES["3"](), TRACES["4"]()])
    assert first == run_all([TRACES["3"](), TRACES["4"]()])


def test_alias_jobs_run_on_one_of_their_models_and_swap_no_more_than_named_ones(
    results: list[Result],
) -> None:
    """On trace 6 every alias job runs on one of its models; naming those models instead saves no swap."""
    aliased = next(r for r in results if r.trace.name == "6-alias" and r.policy == "foreman")
    alias_jobs = [s for s in aliased.served if is_alias_key(s.job.model)]
    assert len(alias_jobs) > len(aliased.served) / 3
    assert all(s.served_by in candidates(s.job.model) for s in alias_jobs)
    assert {s.served_by for s in alias_jobs} == {"phi3", "llama3"}
    named = simulate(served_as(aliased, "named"), Foreman(Policy(max_wait=aliased.trace.max_wait)))
    assert aliased.swaps <= named.swaps
    names = {job.id: job.model for job in named.trace.jobs}
    assert all(names[s.job.id] == s.served_by for s in alias_jobs)
