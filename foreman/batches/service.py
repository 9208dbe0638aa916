"""`Batches`: what moves each batch along OpenAI's lifecycle, read from and written to the database.

Every node runs one, and a step of it does the same thing wherever and
however often it runs, so a restart, a `kill -9` or a second node only makes
it look again:

- `validating`: read the input file; a malformed one fails the batch. Each
  line becomes a batch-class async job whose idempotency key is the batch and
  line: enqueueing again after a crash finds the jobs already written, so no
  line runs twice and none is lost. Lines foreman refuses (their body, an
  unknown model) are recorded as failed without a job. Then `in_progress`.
- `in_progress`: count the lines' jobs by state into `request_counts`. Once
  none waits or runs: `finalizing`. Past its window, the lines still queued
  are cancelled and the batch ends `expired`.
- `cancelling`: cancel the lines still queued; the running ones finish. Then
  the batch ends `cancelled`.
- `finalizing`: write the output and error files and the end of the batch,
  with its webhook events, in one transaction that only one node can win.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import structlog
from ulid import ULID

from foreman.batches import lines
from foreman.dialects.installed import Has, remembered, require_installed
from foreman.dialects.intake import parse_job, request_hash
from foreman.errors import BadRequest, Conflict, ForemanError, NotFound
from foreman.job import QUEUED_ENDPOINTS, JobState, NewJob, Priority
from foreman.ollama.tags import ModelTags
from foreman.queue.front import QueueFront
from foreman.routing.table import RouteTable
from foreman.storage import Storage
from foreman.storage.batches import BatchStore, Delivery, Line, StoredBatch, StoredFile

log = structlog.get_logger("foreman.batches")

WINDOWS = {"24h": 24 * 3600.0}
# Lines submitted per store round: one group commit each, so the loop stays free between them.
ENQUEUE_STEP = 500
# How often a node looks at the active batches when nothing wakes it sooner.
TICK_S = 1.0

# The webhook events a batch's end sends: (type, batch id, now) -> one delivery per endpoint.
Announce = Callable[[str, str, float], list[Delivery]]


def _none(kind: str, batch_id: str, now: float) -> list[Delivery]:
    return []


class Batches:
    """Creates, cancels and advances batches; `run` is the background part."""

    def __init__(
        self,
        *,
        store: Storage,
        batches: BatchStore,
        tags: ModelTags,
        routes: RouteTable,
        clock: Callable[[], float] = time.time,
        announce: Announce = _none,
        tick: float = TICK_S,
    ) -> None:
        self.store, self.batches = store, batches
        self._tags, self._routes = tags, routes
        self._clock, self._tick = clock, tick
        self.announce = announce  # the webhooks' events of a batch's end, once webhooks are configured
        self._nudge = asyncio.Event()
        # The queue's front, once the worker runs (`run` needs it; the API's side does not).
        self.front: QueueFront | None = None

    # The API's side

    async def create(
        self, input_file_id: str, endpoint: str, window: str, metadata: dict[str, str] | None
    ) -> StoredBatch:
        if endpoint not in lines.ENDPOINTS:
            raise BadRequest(f"endpoint must be one of {', '.join(lines.ENDPOINTS)}, not {endpoint!r}")
        if endpoint not in QUEUED_ENDPOINTS:
            raise BadRequest(f"this foreman does not queue {endpoint} yet")
        if window not in WINDOWS:
            raise BadRequest(f"completion_window must be one of {', '.join(WINDOWS)}, not {window!r}")
        file = await self.batches.file(input_file_id)
        if file is None:
            raise NotFound(f"No such File object: {input_file_id}")
        if file.purpose != "batch":
            raise BadRequest(
                f"File {input_file_id} has purpose {file.purpose!r}; a batch needs purpose 'batch'"
            )
        now = self._clock()
        batch = StoredBatch(
            id=f"batch_{ULID()}",
            status="validating",
            endpoint=endpoint,
            input_file_id=input_file_id,
            completion_window=window,
            created_at=now,
            expires_at=now + WINDOWS[window],
            metadata=metadata,
        )
        await self.batches.put_batch(batch)
        log.info("batch.created", batch_id=batch.id, endpoint=endpoint, input_file_id=input_file_id)
        self._nudge.set()
        return batch

    async def cancel(self, batch_id: str) -> StoredBatch:
        now = self._clock()
        if not await self.batches.update(
            batch_id, ("validating", "in_progress"), status="cancelling", times={"cancelling_at": now}
        ):
            batch = await self.batches.batch(batch_id)
            if batch is None:
                raise NotFound(f"No such batch: {batch_id}")
            if batch.status != "cancelling":
                raise Conflict(f"Cannot cancel a batch with status {batch.status!r}.")
        log.info("batch.cancelling", batch_id=batch_id)
        self._nudge.set()
        found = await self.batches.batch(batch_id)
        assert found is not None
        return found

    # The background part

    async def run(self) -> None:
        """Advance the active batches, every tick or when woken, until cancelled."""
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batch.step_failed")
            self._nudge.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudge.wait(), self._tick)

    async def step(self) -> None:
        assert self.front is not None, "Batches.front is set before the batches run"
        for batch in await self.batches.active():
            await self._advance(batch)

    async def _advance(self, batch: StoredBatch) -> None:
        now = self._clock()
        if batch.status == "validating":
            await self._validate(batch, now)
        elif batch.status == "in_progress":
            await self._progress(batch, now)
        elif batch.status == "cancelling":
            await self._cancel_queued(batch, now)
            if await self._counted(batch) == 0:
                await self._finalize(batch, "cancelled", ("cancelling",))
        elif batch.status == "finalizing":
            ending = "expired" if now >= batch.expires_at else "completed"
            await self._finalize(batch, ending, ("finalizing",))

    async def _validate(self, batch: StoredBatch, now: float) -> None:
        content = await self.batches.content(batch.input_file_id)
        try:
            if content is None:
                raise lines.Invalid(
                    [{"code": "file_not_found", "message": f"File {batch.input_file_id} is gone."}]
                )
            requests = lines.parse(content, batch.endpoint)
        except lines.Invalid as exc:
            changes = {"status": "failed", "errors": exc.errors, "times": {"failed_at": now}}
            if await self.batches.finish(
                batch.id, ("validating",), changes, [], self.announce("batch.failed", batch.id, now)
            ):
                log.info(
                    "batch.failed", batch_id=batch.id, errors=len(exc.errors), first=exc.errors[0]["message"]
                )
            return
        await self.batches.update(batch.id, ("validating", "cancelling"), total=len(requests))
        recorded = await self._enqueue(batch, requests, now)
        moved = await self.batches.update(
            batch.id, ("validating",), status="in_progress", times={"in_progress_at": self._clock()}
        )
        if moved:
            log.info("batch.in_progress", batch_id=batch.id, lines=len(requests), refused=recorded)

    async def _enqueue(self, batch: StoredBatch, requests: Sequence[lines.Request], now: float) -> int:
        """Make each line a job (again, after a restart: the same jobs come back); returns the lines refused."""
        has = remembered(self._tags.has)
        refused = 0
        assert self.front is not None
        front = self.front
        for start in range(0, len(requests), ENQUEUE_STEP):
            chunk = requests[start : start + ENQUEUE_STEP]
            recorded: list[Line] = []
            jobs: list[tuple[lines.Request, NewJob]] = []
            for request in chunk:
                try:
                    jobs.append((request, await self._job(batch, request, now, has)))
                except ForemanError as exc:
                    recorded.append(Line(request.line, request.custom_id, None, exc.status, exc.message))
            # Submitted together, so the store commits the chunk as one group.
            outcomes = await asyncio.gather(
                *(front.submit(job, request_hash=request_hash(job)) for _, job in jobs),
                return_exceptions=True,
            )
            for (request, _), outcome in zip(jobs, outcomes, strict=True):
                if isinstance(outcome, ForemanError):
                    recorded.append(
                        Line(request.line, request.custom_id, None, outcome.status, outcome.message)
                    )
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    recorded.append(Line(request.line, request.custom_id, outcome.job_id))
            refused += sum(1 for line in recorded if line.job_id is None)
            await self.batches.add_lines(batch.id, recorded)
        return refused

    async def _job(self, batch: StoredBatch, request: lines.Request, now: float, has: Has) -> NewJob:
        body = json.loads(request.body)
        if body.get("stream") is True:
            raise BadRequest("stream is not supported in a batch")
        job = parse_job(
            batch.endpoint,
            request.body,
            now,
            priority=Priority.BATCH,
            respond_async=True,
            idempotency_key=f"{batch.id}:{request.line}",
        )
        job = self._routes.current.route(job)
        # The check its request would meet alone, so the line gets the same answer.
        await require_installed(job, has)
        return replace(job, stream=False)

    async def _counted(self, batch: StoredBatch) -> int:
        """Write the batch's request counts; returns how many of its lines still wait or run."""
        states = await self.batches.line_states(batch.id)
        completed = states.get(JobState.DONE, 0)
        failed = sum(states.get(s, 0) for s in (JobState.FAILED, JobState.CANCELLED, "rejected"))
        if (completed, failed) != (batch.completed, batch.failed):
            await self.batches.update(
                batch.id, ("in_progress", "cancelling"), completed=completed, failed=failed
            )
        return sum(states.get(s, 0) for s in (JobState.QUEUED, JobState.LOADING, JobState.WORKING))

    async def _progress(self, batch: StoredBatch, now: float) -> None:
        if now >= batch.expires_at:
            await self._cancel_queued(batch, now)
        if await self._counted(batch) == 0 and await self.batches.update(
            batch.id, ("in_progress",), status="finalizing", times={"finalizing_at": now}
        ):
            ending = "expired" if now >= batch.expires_at else "completed"
            await self._finalize(batch, ending, ("finalizing",))

    async def _cancel_queued(self, batch: StoredBatch, now: float) -> None:
        assert self.front is not None
        cancelled = 0
        for job_id in await self.batches.queued_jobs(batch.id):
            cancelled += await self.front.cancel(job_id)
        if cancelled:
            log.info("batch.lines_cancelled", batch_id=batch.id, lines=cancelled, status=batch.status)

    async def _finalize(self, batch: StoredBatch, ending: str, expect: Sequence[str]) -> None:
        """Write the output and error files and end the batch as `ending`, unless another node did."""
        now = self._clock()
        why = "batch_expired" if ending == "expired" else "batch_cancelled"
        output: list[bytes] = []
        errors: list[bytes] = []
        completed = failed = 0
        for outcome in await self.batches.outcomes(batch.id):
            is_error, line = lines.output_line(batch.id, outcome, why)
            (errors if is_error else output).append(line)
            failed += is_error
            completed += not is_error
        files: list[tuple[StoredFile, bytes]] = []
        changes: dict[str, Any] = {
            "status": ending,
            "completed": completed,
            "failed": failed,
            "times": {f"{ending}_at": now},
        }
        for name, content in (("output", output), ("error", errors)):
            if content:
                data = b"".join(content)
                file = StoredFile(
                    f"file-{ULID()}", f"{batch.id}_{name}.jsonl", "batch_output", len(data), now
                )
                files.append((file, data))
                changes[f"{name}_file_id"] = file.id
        deliveries = self.announce(f"batch.{ending}", batch.id, now)
        if await self.batches.finish(batch.id, expect, changes, files, deliveries):
            log.info(f"batch.{ending}", batch_id=batch.id, completed=completed, failed=failed)


def batch_view(batch: StoredBatch) -> dict[str, Any]:
    """A batch in OpenAI's shape (`openai.types.Batch`)."""
    times = {name: int(at) for name, at in batch.times.items()}
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": None if batch.errors is None else {"object": "list", "data": batch.errors},
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": int(batch.created_at),
        "in_progress_at": times.get("in_progress_at"),
        "expires_at": int(batch.expires_at),
        "finalizing_at": times.get("finalizing_at"),
        "completed_at": times.get("completed_at"),
        "failed_at": times.get("failed_at"),
        "expired_at": times.get("expired_at"),
        "cancelling_at": times.get("cancelling_at"),
        "cancelled_at": times.get("cancelled_at"),
        "request_counts": {"total": batch.total, "completed": batch.completed, "failed": batch.failed},
        "metadata": batch.metadata,
    }


def file_view(file: StoredFile) -> dict[str, Any]:
    """A file in OpenAI's shape (`openai.types.FileObject`)."""
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": int(file.created_at),
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }
