"""How many jobs wait, per model and class, and which of them are held back, kept in memory beside the table.

Neither the pick nor the pin decision may count a million rows, so the store
keeps these counts as it writes, and a write that rolls back takes its count
changes back with it (`WaitingCounts.transaction`). Jobs put back after a
failure with a not-before time are few; they are kept by id with that time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from foreman.job import Priority
from foreman.scheduling.policy import Held


class WaitingCounts:
    """Queued jobs per (model key, class) and per model key."""

    def __init__(self) -> None:
        self._by_class: Counter[tuple[str, Priority]] = Counter()
        self._by_model: Counter[str] = Counter()
        self._total = 0
        self._held: dict[tuple[str, Priority], dict[str, Held]] = {}

    def add(self, model_key: str, priority: Priority, delta: int) -> None:
        self._by_class[model_key, priority] += delta
        self._by_model[model_key] += delta
        self._total += delta

    def hold(self, model_key: str, priority: Priority, held: Held) -> None:
        """A queued job of the group is held back until `held.not_before`."""
        self._held.setdefault((model_key, priority), {})[held.job_id] = held

    def release(self, model_key: str, priority: Priority, job_id: str) -> None:
        """The job left the queue (or was never held): it is held no more."""
        group = self._held.get((model_key, priority))
        if group is not None and group.pop(job_id, None) is not None and not group:
            del self._held[model_key, priority]

    def held(self, model_key: str, priority: Priority) -> tuple[Held, ...]:
        """The group's held jobs."""
        return tuple(self._held.get((model_key, priority), {}).values())

    @property
    def total(self) -> int:
        return self._total

    def of_model(self, model_key: str) -> int:
        return self._by_model[model_key]

    def of_class(self, model_key: str, priority: Priority) -> int:
        return self._by_class[model_key, priority]

    def by_model(self) -> dict[str, int]:
        """Model keys with queued jobs, and how many."""
        return {key: count for key, count in self._by_model.items() if count > 0}

    def by_class(self) -> dict[tuple[str, Priority], int]:
        """(model key, class) groups with queued jobs, and how many."""
        return {group: count for group, count in self._by_class.items() if count > 0}

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Changes made in the block are undone if it raises, as the SQL they mirror is rolled back."""
        held = {group: dict(jobs) for group, jobs in self._held.items()}
        saved = self._by_class.copy(), self._by_model.copy(), self._total, held
        try:
            yield
        except BaseException:
            self._by_class, self._by_model, self._total, self._held = saved
            raise
