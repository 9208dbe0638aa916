"""`Outbox`: what this node has to say to the others, in order, and how far it got.

The relay puts a job's chunk and state events here as they happen (and this
node's watches of jobs run elsewhere); the node's sender (`node.Node`) sends
them in order, as many a transaction as are waiting. A job's end does not go
through here: the statement that records it announces it
(`transitions.finish`), so an end is heard if and only if it was recorded.
That statement waits first for `flushed(job_id)`, so an end never overtakes
its job's earlier events (NOTIFYs reach listeners in commit order).
"""

from __future__ import annotations

import asyncio

from foreman.job import JobEvent

# An event of a job this node runs, or a watch (None) of a job run elsewhere.
Item = tuple[str, JobEvent | None]


class Outbox:
    """A FIFO of `Item`s with, per job, the count of its events not yet sent."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self._pending: dict[str, int] = {}
        self._flushed: dict[str, asyncio.Event] = {}
        self._sending = True  # until the node stops: nothing is sent after that

    def put(self, job_id: str, event: JobEvent | None) -> None:
        if event is not None:
            self._pending[job_id] = self._pending.get(job_id, 0) + 1
        self._queue.put_nowait((job_id, event))

    async def take(self) -> list[Item]:
        """The next items to send: at least one (waiting for it), and all that wait behind it."""
        batch = [await self._queue.get()]
        while not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    def sent(self, batch: list[Item]) -> None:
        """`batch` was committed: the jobs whose events are all out may announce their ends."""
        for job_id, event in batch:
            if event is None:
                continue
            left = self._pending[job_id] - 1
            if left:
                self._pending[job_id] = left
                continue
            del self._pending[job_id]
            if (flushed := self._flushed.pop(job_id, None)) is not None:
                flushed.set()

    async def flushed(self, job_id: str) -> None:
        """Return once every event of `job_id` put so far is sent (at once if there is none, or no sender)."""
        if not self._sending or job_id not in self._pending:
            return
        flushed = self._flushed.get(job_id)
        if flushed is None:
            flushed = self._flushed[job_id] = asyncio.Event()
        await flushed.wait()

    def stop(self) -> None:
        """The sender stopped (foreman stops): what it did not send is lost, and nothing waits for it."""
        self._sending = False
        for flushed in self._flushed.values():
            flushed.set()
        self._flushed.clear()
