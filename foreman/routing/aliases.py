"""Alias jobs at pick time, as pure code: which model serves them, and whose drain they join.

A job for an alias is queued under an alias key that names every acceptable
model, in order of preference: `@fast(qwen2:1.5b|llama3:8b)`, followed like
any model key by the load options that split groups. The key alone says how to
resolve the job, so jobs queued before a reload or a restart keep the models
they were accepted for.

Before each pick, the worker and the simulator (`foreman.simulator`) fold the
alias queues into the queues of the models that would serve them now, hand
the folded queues to `scheduler.Policy`, and claim the oldest job of the group
the policy chose. So a job for `fast` joins `llama3:8b`'s drain when Ollama
holds llama3:8b, and a batch mixing both loads once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from foreman.job import Priority
from foreman.ollama.names import is_cloud
from foreman.scheduling.policy import ModelQueue

ALIAS_MARK = "@"


class Why(StrEnum):
    """Why an alias job went to the model it went to (the `job.routed` log line says it)."""

    RESIDENT = "resident"  # Ollama holds it: no swap
    QUEUED = "queued"  # other waiting work needs it loaded anyway: it rides along on that load
    PREFERRED = "preferred"  # none of them is loaded or wanted: the first in order


def alias_key(name: str, models: Sequence[str], load_options: Mapping[str, Any] | None = None) -> str:
    """The key alias jobs queue under; `models` are normalised names, in order of preference."""
    base = f"{ALIAS_MARK}{name}({'|'.join(models)})"
    if not load_options:
        return base
    return f"{base} {json.dumps(dict(load_options), sort_keys=True, separators=(',', ':'))}"


def is_alias_key(key: str) -> bool:
    return key.startswith(ALIAS_MARK)


def alias_of(key: str) -> str:
    """The alias's name inside an alias key."""
    return key[len(ALIAS_MARK) :].split("(", 1)[0]


def candidates(key: str) -> list[str]:
    """The model keys that may serve jobs of alias key `key`, in order of preference.

    The names in the key are used as they are (routes.py normalised them), with
    the key's load options, exactly as `names.model_key` would write them.
    """
    head, _, options = key.partition(" ")
    models = head[head.index("(") + 1 : head.rindex(")")].split("|")
    return [f"{model} {options}" if options else model for model in models]


def resolve(key: str, resident: frozenset[str], wanted: Iterable[str] = ()) -> tuple[str, Why]:
    """The model key that serves a job queued under `key` now, and why.

    An acceptable model Ollama holds comes first; then one that other waiting
    work (`wanted`: model keys of plain jobs) will load anyway; then the first.
    A plain model key resolves to itself.
    """
    if not is_alias_key(key):
        return key, Why.RESIDENT if key in resident else Why.PREFERRED
    options = candidates(key)
    for model in options:
        if model in resident:
            return model, Why.RESIDENT
    wanted = set(wanted)
    for model in options:
        if model in wanted:
            return model, Why.QUEUED
    return options[0], Why.PREFERRED


@dataclass(frozen=True, slots=True)
class Folded:
    """What waits, with alias queues counted under the models that would serve them now."""

    queues: list[ModelQueue]  # what the policy sees: one queue per (model key, class)
    members: Mapping[tuple[str, Priority], Sequence[ModelQueue]]  # the stored queues behind each
    resolved: Mapping[str, tuple[str, Why]]  # alias key → (model key, why)

    def source(self, model_key: str, priority: Priority, job_id: str | None = None) -> str:
        """The stored key to claim from: the one holding `job_id`, else the one with the group's oldest free job."""
        members = self.members[model_key, priority]
        for queue in members:
            if job_id is not None and (
                (queue.waiting > 0 and queue.oldest_id == job_id)
                or any(h.job_id == job_id for h in queue.held)
            ):
                return queue.model_key
        free = [q for q in members if q.waiting > 0] or list(members)
        return min(free, key=lambda q: q.oldest_id).model_key

    def waiting(self, model_key: str) -> int:
        """Jobs of every class that wait for `model_key`, its aliases' included (held ones too)."""
        return sum(q.queued for q in self.queues if q.model_key == model_key)

    def stored_order(self, order: Iterable[tuple[str, Priority]]) -> list[tuple[str, Priority]]:
        """A drain order over folded groups, spelled out as the stored groups behind them."""
        spelled = []
        for group in order:
            members = sorted(self.members.get(group, ()), key=lambda q: q.oldest_id)
            spelled += [(q.model_key, q.priority) for q in members]
        return spelled


def fold(queues: Iterable[ModelQueue], resident: frozenset[str]) -> Folded:
    """Count each alias queue with the model that would serve it if it were picked now.

    Cloud models' queues are left out: the cloud lane serves them, outside
    the drain order (`foreman.worker.cloud_lane`).
    """
    queues = [q for q in queues if q.queued > 0 and not is_cloud(q.model_key)]
    wanted = {q.model_key for q in queues if not is_alias_key(q.model_key)}
    resolved: dict[str, tuple[str, Why]] = {}
    members: dict[tuple[str, Priority], list[ModelQueue]] = {}
    for queue in queues:
        key = queue.model_key
        if is_alias_key(key):
            if key not in resolved:
                resolved[key] = resolve(key, resident, wanted)
            key = resolved[key][0]
        members.setdefault((key, queue.priority), []).append(queue)
    folded = []
    for (key, priority), group in members.items():
        held = tuple(
            h for q in group for h in q.held
        )  # jobs held back after a failure keep their not-before times
        # What other nodes hold and what a dead node left are about the model, whichever key it waits under.
        cluster = {
            "held_elsewhere": max(q.held_elsewhere for q in group),
            "orphaned": sum(q.orphaned for q in group),
        }
        free = [q for q in group if q.waiting > 0]
        if not free:
            folded.append(ModelQueue(key, priority, 0, "", 0.0, held, **cluster))
            continue
        oldest = min(free, key=lambda q: q.oldest_id)
        waiting = sum(q.waiting for q in free)
        folded.append(ModelQueue(key, priority, waiting, oldest.oldest_id, oldest.oldest_at, held, **cluster))
    return Folded(folded, members, resolved)


def waiting_for(waiting: Mapping[str, int], resident: frozenset[str]) -> dict[str, int]:
    """Waiting jobs per stored key, counted under the model keys that would serve them now."""
    wanted = {key for key, count in waiting.items() if count > 0 and not is_alias_key(key)}
    totals: dict[str, int] = {}
    for key, count in waiting.items():
        served = resolve(key, resident, wanted)[0]
        totals[served] = totals.get(served, 0) + count
    return totals
