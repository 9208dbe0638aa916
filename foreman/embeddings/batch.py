"""Coalescing: queued embed jobs that may share a call go to Ollama as one `/api/embed` with a list input.

RAG indexing sends thousands of one-input requests; Ollama pays a fixed cost
per call on top of the cost per input, and serves one call at a time per
model slot. When the worker takes an embed job, `EmbedBatcher.gather` takes
with it the queued embed jobs of the same model key and parameters (see
`foreman.embeddings.requests`), up to FOREMAN_EMBED_BATCH inputs and `max_bytes` of
text. Each job still runs as its own job (its own events, cancel, retries,
record); they meet in one `Batch`, whose call goes out once every member has
arrived (or left). Inputs the cache holds are not sent; inputs repeated
across jobs are sent once.

A call Ollama refuses (4xx) is sent again input by input, so that only the
jobs with a bad input fail, each with Ollama's own error for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial

import structlog

from foreman.embeddings.cache import EmbedCache
from foreman.embeddings.requests import (
    EMBED_ENDPOINTS,
    EmbedRequest,
    call_body,
    job_reply,
    parse_embed,
    read_call_reply,
)
from foreman.errors import UpstreamFailed, UpstreamRejected
from foreman.job import Job
from foreman.metrics import Metrics
from foreman.ollama.client import Upstream
from foreman.storage import CachedVector, Storage

log = structlog.get_logger("foreman.embed")

# Text per call beside the input bound: a call is one HTTP body Ollama reads
# whole, and a few thousand long chunks would make a very large one.
MAX_BATCH_BYTES = 4 * 1024 * 1024
# How many queued embed jobs of the model one gather looks at, per input it may add.
_SCAN_PER_INPUT = 4


@dataclass(frozen=True, slots=True)
class EmbedDone:
    """A member's reply, in its own endpoint's shape."""

    body: bytes
    cache: str | None  # "hit": every vector came from the cache; "partial": some did
    load_ns: int


class EmbedBatcher:
    """Gathers embed jobs into batches and runs their calls; one per worker."""

    def __init__(
        self,
        *,
        store: Storage,
        upstream: Upstream,
        metrics: Metrics,
        max_inputs: int,
        cache: EmbedCache | None = None,
        max_bytes: int = MAX_BATCH_BYTES,
    ) -> None:
        self._store = store
        self.upstream = upstream
        self.metrics = metrics
        self.max_inputs = max_inputs
        self.cache = cache
        self.max_bytes = max_bytes
        self._stopping = False

    def stop(self) -> None:
        """foreman is stopping: a batch gathered from now on sends its companions back to their places."""
        self._stopping = True

    def takes(self, job: Job) -> EmbedRequest | None:
        """The job's embed request if it runs through a batch (coalescing or the cache is on)."""
        if self.max_inputs <= 1 and self.cache is None:
            return None
        return parse_embed(job.endpoint, job.body)

    async def lead(
        self,
        leader: Job,
        request: EmbedRequest,
        now: float,
        *,
        keep_alive: Callable[[int], object | None],
        join: Callable[[Job, Batch], None],
        send_back: Callable[[Job], Awaitable[None]],
    ) -> Batch:
        """Gather the batch `leader` leads, and have its companions `join` it, each run as a job of its own.

        `keep_alive` gives the call's keep_alive from the jobs of the model
        the batch leaves waiting. The companions are taken from the store in
        one step that runs to its end even if the leader is cancelled
        meanwhile: once taken, they run (or, when foreman is stopping, go
        back to their places through `send_back`), and the leader leaves the
        batch instead of holding them up.
        """
        gathering = asyncio.ensure_future(self._lead(leader, request, now, keep_alive, join, send_back))
        try:
            return await asyncio.shield(gathering)
        except asyncio.CancelledError:
            gathering.add_done_callback(
                lambda task: None if task.cancelled() or task.exception() else task.result().leave(leader.id)
            )
            raise

    async def _lead(
        self,
        leader: Job,
        request: EmbedRequest,
        now: float,
        keep_alive: Callable[[int], object | None],
        join: Callable[[Job, Batch], None],
        send_back: Callable[[Job], Awaitable[None]],
    ) -> Batch:
        batch = await self.gather(leader, request, now)
        batch.keep_alive = keep_alive(len(batch.companions))
        if self._stopping:
            # foreman is stopping: the companions go back to their places, uncharged.
            for companion in batch.companions:
                await send_back(companion)
                batch.leave(companion.id)
            return batch
        for companion in batch.companions:
            join(companion, batch)
        return batch

    async def gather(self, leader: Job, request: EmbedRequest, now: float) -> Batch:
        """A batch led by `leader`, with the queued jobs that may share its call taken from the store."""
        companions: list[tuple[Job, EmbedRequest]] = []
        room = self.max_inputs - len(request.inputs)
        if room > 0:
            pick = partial(_pick, request.params, room, self.max_bytes - request.size)
            scan = min(room * _SCAN_PER_INPUT, 4096)
            jobs = await self._store.claim_companions(leader.model_key, EMBED_ENDPOINTS, pick, now, scan)
            for job in jobs:
                parsed = parse_embed(job.endpoint, job.body)
                assert parsed is not None  # _pick took only jobs it could parse
                companions.append((job, parsed))
        return Batch(self, leader, [(leader, request), *companions])


def _pick(params: str, inputs: int, size: int, jobs: list[Job]) -> list[str]:
    """The jobs (oldest first, as given) with the same parameters that fit in `inputs` inputs and `size` bytes."""
    chosen = []
    for job in jobs:
        request = parse_embed(job.endpoint, job.body)
        if request is None or request.params != params:
            continue
        if len(request.inputs) > inputs or request.size > size:
            continue
        chosen.append(job.id)
        inputs -= len(request.inputs)
        size -= request.size
        if inputs <= 0:
            break
    return chosen


class Batch:
    """Jobs that share one call; each member awaits `run`, and the call goes when all have come or left."""

    def __init__(
        self,
        batcher: EmbedBatcher,
        leader: Job,
        members: list[tuple[Job, EmbedRequest]],
    ) -> None:
        self._batcher = batcher
        self._leader = leader
        self._members = {job.id: (job, request) for job, request in members}
        self.keep_alive: object | None = None  # what the call carries: the worker's pin or release
        self._arrived: set[str] = set()
        self._left: set[str] = set()
        self._call: asyncio.Task[dict[str, EmbedDone | UpstreamRejected]] | None = None
        self._started = asyncio.Event()

    @property
    def companions(self) -> list[Job]:
        """The jobs taken beside the leader, which the worker runs as jobs of their own."""
        return [job for job, _ in self._members.values() if job.id != self._leader.id]

    @property
    def size(self) -> int:
        return len(self._members)

    async def run(self, job: Job) -> EmbedDone:
        """The member's reply once the call is done; raises UpstreamRejected for its own bad input,
        or the transient failure of the whole call."""
        self._arrived.add(job.id)
        self._maybe_call()
        try:
            # Until every member came or left; whoever completes the set starts the call.
            await self._started.wait()
            assert self._call is not None
            outcomes = await asyncio.shield(self._call)
        except asyncio.CancelledError:
            self.leave(job.id)
            raise
        outcome = outcomes[job.id]
        if isinstance(outcome, UpstreamRejected):
            raise outcome
        return outcome

    def leave(self, job_id: str) -> None:
        """The member ended without its reply (cancelled, or stopped before it came)."""
        if job_id in self._left:
            return
        self._left.add(job_id)
        if self._call is None:
            self._maybe_call()
        elif not (self._arrived - self._left) and not self._call.done():
            self._call.cancel()  # nobody waits for it any more: Ollama stops too

    def _waiting_for(self) -> set[str]:
        return set(self._members) - self._arrived - self._left

    def _maybe_call(self) -> None:
        if self._call is None and not self._waiting_for() and self._arrived - self._left:
            live = [self._members[job_id] for job_id in self._members if job_id not in self._left]
            self._call = asyncio.ensure_future(self._send(live))
            self._started.set()

    async def _send(self, members: list[tuple[Job, EmbedRequest]]) -> dict[str, EmbedDone | UpstreamRejected]:
        batcher = self._batcher
        cache = batcher.cache
        started = time.monotonic_ns()
        params = members[0][1].params
        model_key = self._leader.model_key
        readers = [request for job, request in members if job.cache != "no-cache"]
        lookup = None
        found: dict[str, CachedVector] = {}
        if cache is not None:
            texts = [text for request in readers for text in request.inputs]
            lookup = await cache.lookup(model_key, params, texts, read=bool(texts))
            found = lookup.found
        reading = {job.id for job, _ in members if job.cache != "no-cache"}
        needed = list(
            dict.fromkeys(
                text
                for job, request in members
                for text in request.inputs
                if job.id not in reading or text not in found
            )
        )
        fresh: dict[str, CachedVector] = {}
        refused: dict[str, UpstreamRejected] = {}
        total_ns = load_ns = 0
        if needed:
            model = members[0][1].model
            try:
                total_ns, load_ns = await self._embed(model, params, needed, fresh, members)
            except UpstreamRejected as exc:
                if len(members) == 1 or len(needed) == 1:
                    refused = dict.fromkeys(needed, exc)
                else:
                    total_ns, load_ns = await self._one_by_one(model, params, needed, fresh, refused)
            if cache is not None and lookup is not None:
                await cache.store(lookup, fresh)
        outcomes: dict[str, EmbedDone | UpstreamRejected] = {}
        elapsed = max(time.monotonic_ns() - started, 1)
        for job, request in members:
            bad = next((refused[text] for text in request.inputs if text in refused), None)
            if bad is not None:
                outcomes[job.id] = bad
                continue
            own = job.id in reading
            vectors = [found[t] if own and t in found else fresh[t] for t in request.inputs]
            from_cache = sum(1 for t in request.inputs if own and t in found)
            served = "hit" if from_cache == len(vectors) else "partial" if from_cache else None
            body = job_reply(
                request,
                [v.vector for v in vectors],
                sum(v.tokens for v in vectors),
                elapsed if served == "hit" else total_ns,
                0 if served == "hit" else load_ns,
            )
            outcomes[job.id] = EmbedDone(body, served, 0 if served == "hit" else load_ns)
        return outcomes

    async def _embed(
        self,
        model: str,
        params: str,
        texts: Sequence[str],
        into: dict[str, CachedVector],
        members: list[tuple[Job, EmbedRequest]],
    ) -> tuple[int, int]:
        """One call for `texts`; their vectors go `into`; returns the call's total and load durations."""
        started = time.monotonic()
        body = call_body(model, params, texts, self.keep_alive)
        async with self._batcher.upstream.post("/api/embed", body) as reply:
            data = await reply.read()
        try:
            answer = read_call_reply(data, texts)
        except ValueError as exc:
            raise UpstreamFailed(f"Ollama's /api/embed answer is not what foreman expects: {exc}") from exc
        for text, vector, tokens in zip(texts, answer.vectors, answer.tokens, strict=True):
            into[text] = CachedVector(vector, tokens)
        self._batcher.metrics.embed_called(len(members))
        log.info(
            "embed.call",
            model=self._leader.model_key,
            jobs=len(members),
            inputs=len(texts),
            job_ids=[job.id for job, _ in members][:8],
            call_s=round(time.monotonic() - started, 3),
        )
        return answer.total_ns, answer.load_ns

    async def _one_by_one(
        self,
        model: str,
        params: str,
        texts: Sequence[str],
        into: dict[str, CachedVector],
        refused: dict[str, UpstreamRejected],
    ) -> tuple[int, int]:
        """After Ollama refused the batch: each input alone, so that only the jobs with a bad one fail."""
        total_ns = load_ns = 0
        for text in texts:
            member = [(job, request) for job, request in self._members.values() if text in request.inputs]
            try:
                total, load = await self._embed(model, params, [text], into, member[:1])
            except UpstreamRejected as exc:
                refused[text] = exc
                continue
            total_ns, load_ns = total_ns + total, load_ns + load
        log.info("embed.split", model=self._leader.model_key, inputs=len(texts), refused=len(refused))
        return total_ns, load_ns
