"""The values foreman's modules pass between each other."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    LOADING = "loading"
    WORKING = "working"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})


class Priority(StrEnum):
    """A job's class: every interactive job is picked before any batch job."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


# The most jobs one page of GET /jobs returns; `foreman jobs --limit` is held to it too.
MAX_PAGE = 1000

# The endpoints whose requests become jobs; every other path is passed through.
QUEUED_ENDPOINTS = (
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/audio/transcriptions",
)
# Those whose replies can stream; the others answer in one piece, whatever `stream` says.
STREAMED_ENDPOINTS = frozenset(
    {"/api/chat", "/api/generate", "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"}
)

# Those whose requests are multipart uploads, kept as they came (`foreman.dialects.multipart`).
MULTIPART_ENDPOINTS = frozenset({"/v1/audio/transcriptions"})


def boundary_of(body: bytes) -> str | None:
    """The boundary a multipart body opens with (`--BOUNDARY` on its first line), if it opens with one."""
    if not body.startswith(b"--"):
        return None
    first = body.split(b"\n", 1)[0].rstrip(b"\r")[2:]
    return first.decode("ascii", "replace") if first else None


def body_content_type(body: bytes) -> str:
    """The Content-Type a job's body goes to Ollama with: JSON, or the multipart form it opens as."""
    boundary = boundary_of(body)
    return "application/json" if boundary is None else f'multipart/form-data; boundary="{boundary}"'


# The content type of Ollama's (and foreman's) JSON answers.
JSON_TYPE = "application/json; charset=utf-8"


@dataclass(frozen=True, slots=True)
class NewJob:
    """A validated request, ready to be written to the store."""

    id: str
    endpoint: str
    model: str  # exactly as the client sent it; Ollama echoes it back
    model_key: str  # normalised name plus load options: the unit of residency
    stream: bool
    body: bytes  # the request body as the client sent it (an alias's defaults added, see routes.py)
    created_at: float
    respond_async: bool = False  # the client took a 202 and collects the result later
    idempotency_key: str | None = None
    priority: Priority = Priority.INTERACTIVE
    routing: str | None = None  # for an alias job: JSON {"alias", and "route", "rule" if a route chose it}
    cache: str | None = None  # "no-cache": the client asked that the embedding cache not answer it

    def started(self, at: float) -> Job:
        """The job as the store holds it once claimed at `at`, the moment it was written."""
        return Job(
            id=self.id,
            state=JobState.WORKING,
            endpoint=self.endpoint,
            model=self.model,
            model_key=self.model_key,
            stream=self.stream,
            body=self.body,
            attempt=0,
            created_at=self.created_at,
            started_at=at,
            finished_at=None,
            status=None,
            error=None,
            result=None,
            respond_async=self.respond_async,
            priority=self.priority,
            routing=self.routing,
            cache=self.cache,
        )


@dataclass(frozen=True, slots=True)
class Job:
    """A job row as the store holds it."""

    id: str
    state: JobState
    endpoint: str
    model: str
    model_key: str
    stream: bool
    body: bytes
    attempt: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    status: int | None  # the HTTP status the job ended with
    error: str | None
    result: bytes | None
    respond_async: bool = False
    priority: Priority = Priority.INTERACTIVE
    routing: str | None = None  # as NewJob.routing
    served_model: str | None = None  # for an alias job: the model picked to serve it
    cache: str | None = None  # "no-cache" as asked, or how the embedding cache served it: "hit", "partial"
    not_before: float | None = None  # held back after a failure until then (while queued)

    @property
    def queue_wait(self) -> float | None:
        """Seconds from arrival to the start of its latest attempt, or to its end if it never started."""
        waited_until = self.started_at if self.started_at is not None else self.finished_at
        return None if waited_until is None else waited_until - self.created_at

    @property
    def run_time(self) -> float | None:
        return (
            None
            if self.finished_at is None or self.started_at is None
            else self.finished_at - self.started_at
        )


# A job's events: what the handlers waiting on it hear (foreman/queue/job_events.py), from this
# node's worker or, through the storage's relay, another node's.


@dataclass(frozen=True, slots=True)
class Chunk:
    """One NDJSON line of Ollama's streamed reply, newline included."""

    data: bytes


@dataclass(frozen=True, slots=True)
class StateChanged:
    state: JobState
    attempt: int
    model: str | None = None  # when the job starts: the model that serves it


@dataclass(frozen=True, slots=True)
class Ended:
    """The job is over for this handler.

    `body` is the whole reply when nothing was streamed (a `stream: false`
    answer, or an error before the first chunk); after chunks, a non-empty
    body is an error to send as the stream's last line.
    """

    state: JobState
    status: int
    body: bytes
    content_type: str = JSON_TYPE
    error: str | None = None  # what went wrong, as the job's record keeps it


JobEvent = Chunk | StateChanged | Ended


@dataclass(frozen=True, slots=True)
class ModelStats:
    """What the worker knows about one model: residency, scheduling state, learned costs.

    Means are over every observation since foreman started; None until the
    first one. This is what /status shows per model.
    """

    model_key: str
    resident: bool  # Ollama holds it, as foreman last read /api/ps
    serving: bool  # the model of the latest job the worker started
    draining: bool  # a max_wait drain of this model is under way
    pinned: bool  # foreman asked Ollama to keep it loaded (FOREMAN_PIN_KEEP_ALIVE) while work waits
    loads: int
    mean_load_s: float | None
    last_load_s: float | None
    runs: int
    mean_run_s: float | None
