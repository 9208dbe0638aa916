"""What foreman asks of the place its jobs live, whatever backend holds them.

The worker, the queued endpoints, the job API, /status and retention speak to
`Storage` and to nothing else; `SqliteStorage` (`foreman/storage/sqlite/`) and
`PostgresStorage` (`foreman/storage/postgres/`) implement it, and both pass the
contract suite in `tests/storage/contract.py`.

The interface assumes nothing about who else uses the same jobs: a backend
shared by several foreman processes (each with its own worker) fits it as well
as one file owned by one process. A claim takes a job for the caller and no
one else; everything a backend needs to make that true between nodes (locks,
leases, node ids) stays inside it. What the nodes tell each other beside the
queue (a job's events, cancels, who is there) is the relay's
(`foreman/storage/relay.py`); `foreman/storage/backends.py` opens the backend
FOREMAN_DB names, with its relay.

Times are seconds on the caller's clock (`now`): the store never reads a clock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import structlog

from foreman.errors import Conflict
from foreman.job import Ended, Job, JobState, NewJob, Priority
from foreman.scheduling.policy import Decision, ModelQueue

log = structlog.get_logger("foreman.store")

# The (model, class) queues in the order they will be served, given what waits.
DrainOrder = Callable[[list[ModelQueue]], list[tuple[str, Priority]]]
# The policy's choice among what waits; None when nothing should run.
Chooser = Callable[[list[ModelQueue]], Decision | None]


@dataclass(frozen=True, slots=True)
class CachedVector:
    """An embedding the cache holds: the vector as Ollama's JSON array, and its input's token count."""

    vector: bytes
    tokens: int


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """An embedding to cache under `key` (model digest, parameters and input hashed), for the model `digest`."""

    key: bytes
    digest: str
    vector: bytes
    tokens: int


@dataclass(frozen=True, slots=True)
class CacheStats:
    entries: int
    bytes: int


@dataclass(frozen=True, slots=True)
class CacheAnswer:
    """An embed job the cache may answer as it is written: the storage looks `keys` up itself.

    When every key is cached, the job is written done (`cache = 'hit'`) with
    `reply(vectors)` as its result, in the transaction that writes it, and
    never queues. `reply` gets the vectors in the order of `keys` and builds
    the client's reply from them alone: no I/O and no storage, so any backend
    can call it wherever its transaction runs. Should it raise, the job queues
    as if nothing were cached.
    """

    keys: tuple[bytes, ...]
    reply: Callable[[list[CachedVector]], bytes]

    def from_found(self, found: Mapping[bytes, CachedVector], job_id: str) -> bytes | None:
        """The reply if `found` (what the cache holds of `keys`) has every key, else None (the job queues)."""
        if len(found) < len(set(self.keys)):
            return None  # the worker looks again, and sends only what is missing
        try:
            return self.reply([found[key] for key in self.keys])
        except Exception:
            # A bug here must not refuse the job: it queues, and the worker serves it.
            log.exception("embed_cache.answer_failed", job_id=job_id)
            return None


@dataclass(frozen=True, slots=True)
class Submission:
    """A job to write; with `drain_order`, its place in line comes back too."""

    job: NewJob
    request_hash: str | None = None  # tells a retried submission (same idempotency key) from a different one
    drain_order: DrainOrder | None = None
    answer: CacheAnswer | None = None  # the embedding cache may answer it at once
    # The worker's pick, for a job it may run at once: the store claims the job as it
    # writes it when nothing else waits and this picks it (see `Storage.submit`).
    run_now: Chooser | None = None


@dataclass(frozen=True, slots=True)
class Accepted:
    """A submission the store kept, or the earlier job it stands for."""

    job_id: str
    new: bool  # False: an earlier submission with the same idempotency key
    state: JobState
    position: int | None  # queued jobs ahead of it, when the submission asked
    result: bytes | None = None  # the reply, when the cache answered it (`Submission.answer`)
    claim: Claim | None = None  # the job, claimed as it was written (`Submission.run_now`)


@dataclass(frozen=True, slots=True)
class Claim:
    """A job the worker took, why, and what still waits for its model."""

    job: Job
    decision: Decision
    waiting_after: int  # queued jobs of the same model key, all classes


@dataclass(frozen=True, slots=True)
class RecordedPin:
    """A pin foreman set on a model of its Ollama, as recorded: how to load `model_key` again to release it."""

    model_key: str
    endpoint: str
    model: str
    options: str  # the load options, JSON


class Recovered(NamedTuple):
    """What a restart found running: put back in line, or failed for good."""

    requeued: int
    failed: int


class IdempotencyConflict(Conflict):
    """The idempotency key is taken by a job with a different request."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(f"Idempotency-Key {key!r} was already used for a different request (job {job_id})")
        self.job_id = job_id


class Storage(Protocol):
    """The durable queue of jobs, for coroutines. Errors are `ForemanError`s where a client can see them."""

    # Intake

    def submit(self, submission: Submission) -> Awaitable[Accepted]:
        """Write a new job; the awaitable resolves once it is durable.

        The write is under way when this returns (not when it is awaited), so
        a claim asked for after it, for example by the worker it wakes, is
        ordered behind it and finds the job once the awaitable resolved.
        With `submission.answer`, a job the cache can answer whole is written
        done with its reply instead (`CacheAnswer`), and `Accepted.result`
        carries the reply. With `submission.run_now`, a backend that can tell
        on the spot that nothing else waits may ask it about the job alone and,
        if it picks the job, write it already claimed (started, never queued):
        `Accepted.claim` is the claim, the caller's to run. A backend that
        cannot tell without a round trip (the shared PostgreSQL queue) writes
        the job queued, as without it. Refusals come as exceptions: `IdempotencyConflict` when the job's
        idempotency key was used for a different request (the same request
        resolves to the earlier job with `new=False`), `QueueFull` when the
        queue holds `max_queue` waiting jobs, `Unavailable` when the store
        cannot be written at all; a refused job is not kept, and nothing
        accepted before is lost.
        """
        ...

    # The worker

    async def recover(self, now: float, max_attempts: int) -> Recovered:
        """At start, put jobs left running by a stopped worker back in line, charging each an attempt.

        A job whose attempts reach `max_attempts` fails instead (status 500),
        so a job that brings the daemon down every time does not run forever.
        """
        ...

    async def queues(self) -> list[ModelQueue]:
        """What waits, one entry per (model key, class) with at least one queued job.

        Jobs put back with a not-before time (`requeue`) are listed in
        `ModelQueue.held` with it, whether or not it has come, and not counted
        in `waiting` nor named by `oldest_id`: when they may run is the
        policy's to say.
        """
        ...

    async def claim(self, choose: Chooser, now: float) -> Claim | None:
        """Let `choose` pick from what waits now, and take the job of its choice.

        That is the job `Decision.job_id` names if it does (held or not, as
        long as it is queued), else the oldest queued job of the decision's
        (model key, class). The job is `loading` if the decision is a swap,
        `working` otherwise, with `started_at = now` and its not-before time
        cleared; None when `choose` returns None. Choosing and taking are one
        step: no other claim takes the job in between.
        """
        ...

    async def claim_companions(
        self,
        model_key: str,
        endpoints: Sequence[str],
        pick: Callable[[list[Job]], list[str]],
        now: float,
        scan: int,
    ) -> list[Job]:
        """Take queued jobs of `model_key` to run beside a running one (an embedding batch); `working` now.

        `pick` is shown up to `scan` queued jobs of `model_key` for
        `endpoints`, interactive before batch and each class oldest first,
        leaving out jobs whose not-before time is after `now`; it returns the
        ids to take. They come back taken, oldest first, as one step (no other
        claim takes them), with `started_at = now` and not-before cleared.
        `pick` is pure: no I/O and no storage.
        """
        ...

    async def waiting(self, model_key: str) -> int:
        """Queued jobs of `model_key`, all classes."""
        ...

    async def waiting_by_model(self) -> dict[str, int]:
        """Queued jobs per model key, all classes; keys with none are left out."""
        ...

    async def mark_working(self, job_id: str) -> None:
        """A claimed job's model finished loading: the job is `working` now."""
        ...

    async def requeue(
        self, job: Job, *, attempt: int, error: str | None, not_before: float | None = None
    ) -> None:
        """Put a running job back in line at its old place (it keeps its id); a no-op once it ended.

        It waits under the model key it was stored with (an alias job's, not
        that of the model it was about to run on), and forgets `served_model`.
        With `not_before` it is held until then (it failed, and other work is
        served meanwhile): `queues` lists it in `ModelQueue.held`, durably, so
        a restart finds it held too.
        """
        ...

    async def set_served(self, job_id: str, model: str) -> None:
        """Record which model serves an alias job (`Job.served_model`)."""
        ...

    def finish(
        self,
        job: Job,
        state: JobState,
        now: float,
        *,
        status: int,
        result: bytes | None = None,
        error: str | None = None,
        attempt: int | None = None,
        chunks: Sequence[bytes] = (),
        cache: str | None = None,
        ended: Ended | None = None,
    ) -> Awaitable[None]:
        """End a running job for good with its output: the reply `result` or the streamed `chunks`.

        As with `submit`, the write is under way when this returns: a backend
        may commit the finishes asked for in one turn of the event loop
        together (an embedding batch's members end in the same turn).

        A job that already ended (cancelled meanwhile) stays as it ended,
        chunks included. `attempt`, if given, replaces the job's count;
        `cache`, if given, says how the embedding cache served it
        (`Job.cache`: 'hit' or 'partial').

        `ended` is the end its waiters hear. A backend shared by several
        nodes announces it to the others with the record, in one step: only
        if the job ended here (not if it had ended, or is no longer this
        node's), and after the job's events sent before (the relay's
        `forward` leaves the ends of the jobs this node ran to it). A node
        alone has no one to tell.
        """
        ...

    async def cancel_queued(self, job_id: str, now: float) -> bool:
        """Cancel a job that has not started (status 499); False if it is not queued."""
        ...

    # Reads for the job API and /status

    async def get(self, job_id: str) -> Job | None:
        """The job with its request body and result; None if there is no such job."""
        ...

    async def list_jobs(
        self, *, state: JobState | None, model_key: str | None, limit: int, before: str | None
    ) -> list[Job]:
        """Up to `limit` jobs, newest first, older than the job id `before`.

        `model_key` matches the key itself and its variants with load options
        (`"llama3"` matches `"llama3 {...}"`). The jobs come without request
        and result (`body == b""`, `result is None`): a page never copies them.
        """
        ...

    async def chunks(self, job_id: str) -> list[bytes]:
        """The output lines a finished streamed job produced, in order."""
        ...

    async def position(self, job_id: str, model_key: str, priority: Priority, drain_order: DrainOrder) -> int:
        """How many queued jobs run before this queued one if the queue drains in `drain_order`."""
        ...

    async def counts_by_state(self) -> dict[str, int]:
        """How many jobs are in each state; states with none are left out."""
        ...

    # The embedding cache: vectors beside the jobs, so they survive restarts (see foreman/embeddings/cache.py)

    async def cache_get(self, keys: Sequence[bytes]) -> dict[bytes, CachedVector]:
        """The vectors cached under `keys` (those found), each marked as just used."""
        ...

    async def cache_put(self, entries: Sequence[CacheEntry], limit: int) -> int:
        """Store vectors, then evict the least recently used down to `limit` bytes; returns how many went."""
        ...

    async def cache_evict(self, limit: int) -> int:
        """Evict the least recently used vectors down to `limit` bytes (a smaller FOREMAN_EMBED_CACHE)."""
        ...

    async def cache_invalidate(self, digests: Sequence[str]) -> int:
        """Drop every vector of the models with these digests; returns how many."""
        ...

    async def cache_stats(self) -> CacheStats:
        """How many vectors the cache holds, and the bytes they count against its bound."""
        ...

    # Pins: which models this daemon (this node) keeps loaded with FOREMAN_PIN_KEEP_ALIVE, so a restart
    # after kill -9 can release those the dead one left behind (see foreman/worker/residency.py)

    async def pins(self) -> list[RecordedPin]:
        """The pins recorded last, by model key."""
        ...

    async def set_pins(self, pins: Sequence[RecordedPin]) -> None:
        """Record these pins in place of the ones recorded before."""
        ...

    # Upkeep

    async def prune(self, cutoff: float, batch: int) -> int:
        """Delete up to `batch` jobs that ended before `cutoff`, with their output; returns how many."""
        ...

    async def ping(self) -> None:
        """Return once the store answers a query; raise if it does not (for /healthz)."""
        ...

    async def describe(self) -> dict[str, Any]:
        """The store for /status's `db`: JSON-ready facts such as `backend`, where it lives, its size."""
        ...

    async def close(self) -> None:
        """Finish pending writes and let go of the store; no call may follow."""
        ...
