"""How the worker learns that something changed: events, not polling."""

from __future__ import annotations

import asyncio


class WakeUps:
    """The worker's two events: `work` (look at the queue again) and `arrived` (a job was queued)."""

    def __init__(self) -> None:
        self.work = asyncio.Event()
        # Set when a job is queued: a load begun for batch work may be given up.
        self.arrived = asyncio.Event()
        self.arrived_for: set[str] = set()  # model keys of the jobs queued since the last look

    def job_queued(self, model_key: str) -> None:
        """New work for `model_key` is in the store."""
        self.work.set()
        self.arrived.set()
        self.arrived_for.add(model_key)

    def look_again(self) -> None:
        """Something other than an arrival changed (a job ended, a model loaded): look at the queue."""
        self.work.set()
