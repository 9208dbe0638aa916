"""What the Files and Batch APIs and the webhook outbox keep, whatever backend holds the jobs.

Their tables live in the jobs' database, beside the jobs (so a batch line can
be joined to its job, and every node of a shared queue sees the same files),
but apart from `Storage`: the queue's hot path never touches them. Each
backend implements `BatchStore` in its own module (`sqlite/batches.py`,
`postgres/batches.py`), opened with the rest of the backend by
`backends.opened`, and both pass `tests/storage/test_batches.py`.

Times are seconds on the caller's clock; the store never reads a clock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from foreman.job import JobState

# A file is written in parts of this size, each in its own short transaction:
# a 200 MB upload never holds SQLite's write lock for long.
PART_BYTES = 1024 * 1024


def split(data: bytes) -> list[bytes]:
    """`data` in parts of PART_BYTES (one empty part for an empty file)."""
    return [data[i : i + PART_BYTES] for i in range(0, len(data), PART_BYTES)] or [b""]


# The statuses of a batch that still has work to do (OpenAI's names).
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
# Those of a batch that ended; each has its time in `times` as `<status>_at`.
ENDED = ("completed", "failed", "expired", "cancelled")


@dataclass(frozen=True, slots=True)
class StoredFile:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: float


@dataclass(frozen=True, slots=True)
class StoredBatch:
    """A batch row. `times` holds OpenAI's optional timestamps by name (`in_progress_at`, ...)."""

    id: str
    status: str
    endpoint: str
    input_file_id: str
    completion_window: str
    created_at: float
    expires_at: float
    times: dict[str, float] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None  # validation errors, OpenAI's BatchError shape
    metadata: dict[str, str] | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class Line:
    """One request of a batch: its job, or why it never became one (`status`, `error`)."""

    line: int  # 1-based, as in the input file
    custom_id: str
    job_id: str | None
    status: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """A line with what its job came to (`state` None: it never became a job)."""

    line: int
    custom_id: str
    job_id: str | None
    state: JobState | None
    status: int | None
    error: str | None
    result: bytes | None


@dataclass(frozen=True, slots=True)
class Delivery:
    """A webhook event on its way to one endpoint: the same `id` on every attempt."""

    id: str  # webhook-id
    endpoint: str
    body: bytes
    attempts: int
    created_at: float
    next_at: float


# From a watched job that ended (id, endpoint, state): the delivery that tells of it.
JobEventMaker = Callable[[str, str, JobState], Delivery]


class BatchStore(Protocol):
    # Files

    async def put_file(self, file: StoredFile, parts: Sequence[bytes]) -> None:
        """Write a file; it is listed only once every part is in."""
        ...

    async def file(self, file_id: str) -> StoredFile | None: ...

    async def files(
        self, *, purpose: str | None, after: str | None, limit: int, newest_first: bool
    ) -> list[StoredFile]:
        """Up to `limit` files past the id `after` in the order asked."""
        ...

    async def content(self, file_id: str) -> bytes | None: ...

    async def drop_unfinished_uploads(self, before: float) -> int:
        """Delete files whose upload began before `before` and never finished (a crash mid-upload); how many."""
        ...

    async def delete_file(self, file_id: str) -> bool: ...

    # Batches

    async def put_batch(self, batch: StoredBatch) -> None: ...

    async def batch(self, batch_id: str) -> StoredBatch | None: ...

    async def batches(self, *, after: str | None, limit: int) -> list[StoredBatch]:
        """Up to `limit` batches older than the id `after`, newest first."""
        ...

    async def active(self) -> list[StoredBatch]:
        """The batches whose status is in `ACTIVE`, oldest first."""
        ...

    async def update(self, batch_id: str, expect: Sequence[str], **changes: Any) -> bool:
        """Change the batch's fields if its status is one of `expect`; False if it was not.

        `times` merges into the stored timestamps rather than replacing them.
        """
        ...

    async def add_lines(self, batch_id: str, lines: Sequence[Line]) -> None:
        """Record lines; one already recorded (a restart enqueueing again) stays as it was."""
        ...

    async def line_states(self, batch_id: str) -> dict[str, int]:
        """How many lines are in each job state; lines that never became a job count as `rejected`."""
        ...

    async def queued_jobs(self, batch_id: str) -> list[str]:
        """The ids of the batch's jobs still queued."""
        ...

    async def outcomes(self, batch_id: str) -> list[Outcome]:
        """Every line with its job's end, in file order."""
        ...

    async def finish(
        self,
        batch_id: str,
        expect: Sequence[str],
        changes: dict[str, Any],
        files: Sequence[tuple[StoredFile, bytes]],
        deliveries: Sequence[Delivery],
    ) -> bool:
        """End a batch if its status is one of `expect`: its files, its change and its webhook events are one transaction.

        Its lines go with it: the files hold their outcomes from then on.
        """
        ...

    # Retention: each call is one short transaction.

    async def prune_batches(self, cutoff: float, limit: int) -> tuple[int, list[str]]:
        """Delete up to `limit` batches that ended before `cutoff`, with their lines; how many, and the files they leave.

        Those are hidden at once, as an unfinished upload is (no read finds them
        again), for `drop_file_parts` to delete: the batches' output and error
        files, and an input file no batch kept still names.
        """
        ...

    async def drop_file_parts(self, file_id: str, limit: int) -> bool:
        """Delete up to `limit` parts of a hidden file, and the file once no part is left; False once it is gone.

        A file that is not hidden (complete, listed) is left alone.
        """
        ...

    async def prune_deliveries(self, cutoff: float, limit: int) -> int:
        """Delete up to `limit` deliveries delivered or given up before `cutoff`; how many."""
        ...

    # The webhook outbox

    async def watch_job(self, job_id: str, endpoint: str) -> None:
        """Send `endpoint` an event when the job ends."""
        ...

    async def ended_watched_jobs(self, make: JobEventMaker, limit: int) -> int:
        """Turn up to `limit` watched jobs that ended into deliveries (`make`), and stop watching them; how many."""
        ...

    async def enqueue_events(self, deliveries: Sequence[Delivery]) -> None:
        """Add deliveries; one whose (id, endpoint) is already there stays as it was."""
        ...

    async def due_deliveries(self, now: float, lease: float, owner: str, limit: int) -> list[Delivery]:
        """Take deliveries due by `now` for `owner` until `now + lease`; no other owner gets them meanwhile."""
        ...

    async def delivered(self, delivery: Delivery) -> None: ...

    async def retry_later(self, delivery: Delivery, next_at: float, error: str) -> None: ...

    async def give_up(self, delivery: Delivery, error: str) -> None: ...

    async def delivery_counts(self) -> dict[str, int]:
        """Deliveries still `pending` and `failed` (given up), by state; delivered ones are not counted."""
        ...

    async def close(self) -> None: ...
