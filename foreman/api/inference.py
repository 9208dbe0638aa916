"""The queued endpoints: each request becomes a job, then waits for it or is handed its id."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from functools import partial

import structlog
from aiohttp import web

from foreman.api.keys import CLOCK, CONFIG, EMBED_CACHE, EVENTS, MODEL_TAGS, QUEUE, ROUTES
from foreman.api.request_body import read_body
from foreman.dialects import dialect_for
from foreman.dialects.installed import require_installed
from foreman.dialects.intake import parse_job, parse_priority, request_hash
from foreman.embeddings.cache_answer import cache_answer, wants_no_cache
from foreman.embeddings.requests import EMBED_ENDPOINTS
from foreman.job import JSON_TYPE, JobState, NewJob
from foreman.queue.front import QueueFront
from foreman.queue.job_events import Chunk, Ended, JobEvent, StateChanged
from foreman.queue.lifecycle import error_body
from foreman.storage import CacheAnswer, Claim

log = structlog.get_logger("foreman.api")

JOB_HEADER = "X-Foreman-Job"
MODEL_HEADER = "X-Foreman-Model"  # the model that served the job (for an alias: the one picked)
PRIORITY_HEADER = "X-Foreman-Priority"


async def handle(request: web.Request) -> web.StreamResponse:
    """Write the request as a job; answer 202 at once, or with what the worker produces for it."""
    respond_async = prefers_async(request)
    config = request.app[CONFIG]
    raw = await read_body(request, config.max_body, config.read_timeout)
    default_priority = config.async_priority if respond_async else config.sync_priority
    job = parse_job(
        request.path,
        raw,
        request.app[CLOCK](),
        priority=parse_priority(request.headers.get(PRIORITY_HEADER), default_priority),
        respond_async=respond_async,
        idempotency_key=request.headers.get("Idempotency-Key") if respond_async else None,
        content_type=request.headers.get("Content-Type"),
    )
    job = request.app[ROUTES].current.route(job)
    await require_installed(job, request.app[MODEL_TAGS].has)
    answer = None
    if job.endpoint in EMBED_ENDPOINTS:
        if wants_no_cache(request):
            job = replace(job, cache="no-cache")
        else:
            answer = await cache_answer(request.app[EMBED_CACHE], job)
    if respond_async:
        return await _accept(request, job, answer)
    return await _serve(request, job, answer)


def prefers_async(request: web.Request) -> bool:
    """Whether the client sent `Prefer: respond-async` (RFC 7240)."""
    for header in request.headers.getall("Prefer", ()):
        for preference in header.split(","):
            if preference.split(";")[0].split("=")[0].strip().lower() == "respond-async":
                return True
    return False


async def _accept(request: web.Request, job: NewJob, answer: CacheAnswer | None) -> web.Response:
    """Commit an async job and hand back its id and place in line."""
    fingerprint = request_hash(job) if job.idempotency_key is not None else None
    accepted = await request.app[QUEUE].submit(
        job, answer=answer, request_hash=fingerprint, with_position=True
    )
    job_id = accepted.job_id
    return web.json_response(
        {"id": job_id, "state": accepted.state, "position": accepted.position},
        status=202 if accepted.new else 200,
        headers={"Location": f"/jobs/{job_id}", "Preference-Applied": "respond-async", JOB_HEADER: job_id},
    )


async def _serve(request: web.Request, job: NewJob, answer: CacheAnswer | None) -> web.StreamResponse:
    app = request.app
    queue = app[QUEUE]
    with app[EVENTS].subscribe(job.id, client=True) as inbox:
        try:
            accepted = await queue.submit(
                job, answer=answer, run_here=_may_run_here(job, app[CONFIG].embed_batch)
            )
            if accepted.result is not None:
                headers = {"Content-Type": JSON_TYPE, JOB_HEADER: job.id}
                return web.Response(body=accepted.result, headers=headers)
            if accepted.claim is not None:
                if job.stream:
                    # Claimed as it was written: it runs beside this handler, which writes its chunks as they come.
                    request[_BESIDE] = _run_beside(queue, accepted.claim, inbox)
                else:
                    # Claimed as it was written: it runs here, and its events are in the inbox by its end.
                    await queue.run(accepted.claim)
            return await _respond(request, job, inbox, app[CONFIG].early_headers)
        except (asyncio.CancelledError, ConnectionResetError):
            # The client went away: like Ollama, stop working for it.
            await asyncio.shield(queue.cancel(job.id))
            raise


def _may_run_here(job: NewJob, embed_batch: int) -> bool:
    """Whether the job may be claimed as it is written and run by its handler, when the worker could start it at once.

    Not an embed job that may share a call: the turn the worker takes to
    claim it lets the requests that arrive with it join its batch (run at
    once, the first of a wave of one-input requests would go alone, and the
    rest after it).
    """
    return embed_batch <= 1 or job.endpoint not in EMBED_ENDPOINTS


# A stream's job running beside its handler, held by the request: the loop keeps only weak references to tasks.
_BESIDE = web.RequestKey("foreman_beside", asyncio.Future[None])


def _run_beside(queue: QueueFront, claim: Claim, inbox: asyncio.Queue[JobEvent]) -> asyncio.Future[None]:
    """Run a stream's job on a task of its own, the handler's job being to write what it streams.

    The client leaving cancels it through the queue, as any running job; a
    bug that ends the task early ends the client's wait with a 500, not never.
    """
    running = asyncio.ensure_future(queue.run(claim))
    running.add_done_callback(partial(_ran_beside, inbox))
    return running


def _ran_beside(inbox: asyncio.Queue[JobEvent], running: asyncio.Future[None]) -> None:
    if running.cancelled() or (error := running.exception()) is None:
        return
    log.error("request.error", exc_info=error)
    inbox.put_nowait(Ended(JobState.FAILED, 500, error_body(_INTERNAL), error=_INTERNAL))


async def _respond(
    request: web.Request, job: NewJob, inbox: asyncio.Queue[JobEvent], early_headers: float
) -> web.StreamResponse:
    dialect = dialect_for(job.endpoint)
    stream: web.StreamResponse | None = None
    # An alias job's model is known once it is picked; until then, no header names one.
    served = None if job.routing else job.model
    following: JobEvent | None = None  # taken from the inbox with chunks, not yet handled
    while True:
        if following is not None:
            event, following = following, None
        elif stream is None and job.stream:
            try:
                async with asyncio.timeout(early_headers):  # no task of its own, as wait_for's would be
                    event = await inbox.get()
            except TimeoutError:
                stream = await _start_stream(request, job, served)
                continue
        else:
            event = await inbox.get()
        if isinstance(event, Chunk):
            if stream is None:
                stream = await _start_stream(request, job, served)
            # The chunks that came while the last write went out go out together: one send, not one each.
            frames = [dialect.frame(event.data)]
            while not inbox.empty():
                following = inbox.get_nowait()
                if not isinstance(following, Chunk):
                    break
                frames.append(dialect.frame(following.data))
                following = None
            await stream.write(frames[0] if len(frames) == 1 else b"".join(frames))
        elif isinstance(event, StateChanged):
            served = event.model or served
        elif isinstance(event, Ended):
            return await _finish(request, job, stream, event, served)


def _headers(job: NewJob, served: str | None) -> dict[str, str]:
    headers = {JOB_HEADER: job.id}
    if served is not None:
        headers[MODEL_HEADER] = served
    return headers


async def _start_stream(request: web.Request, job: NewJob, served: str | None) -> web.StreamResponse:
    content_type = dialect_for(job.endpoint).stream_type
    stream = web.StreamResponse(headers={"Content-Type": content_type, **_headers(job, served)})
    await stream.prepare(request)
    return stream


async def _finish(
    request: web.Request, job: NewJob, stream: web.StreamResponse | None, ended: Ended, served: str | None
) -> web.StreamResponse:
    dialect = dialect_for(job.endpoint)
    if stream is None:
        failed = ended.state is not JobState.DONE
        headers = {"Content-Type": ended.content_type, **_headers(job, served)}
        if ended.state is JobState.QUEUED:
            # The job stays queued and runs later: a client retry would run it twice.
            # (The openai SDKs retry 5xx unless told not to.)
            headers["x-should-retry"] = "false"
        return web.Response(
            status=ended.status,
            body=dialect.client_error(ended.body, ended.status) if failed else ended.body,
            headers=headers,
        )
    if ended.state is JobState.DONE:
        if ended.body:  # a whole reply after early headers, such as a load's
            await stream.write(dialect.frame(ended.body.rstrip(b"\n") + b"\n"))
        await stream.write(dialect.end())
    elif ended.body:
        # Headers are gone: like Ollama, report a late failure as the last line.
        await stream.write(dialect.late_error(ended.body))
    await stream.write_eof()
    return stream


# What a client hears if its job's task failed on a bug in foreman (the log has it), as error_shape says it.
_INTERNAL = "internal error in foreman; the log has the details"

# What handlers still waiting at shutdown tell their clients.
_SHUTTING_DOWN = "foreman is shutting down; the job stays queued and runs after the restart"
SHUTTING_DOWN = Ended(
    JobState.QUEUED, 503, json.dumps({"error": _SHUTTING_DOWN}).encode(), error=_SHUTTING_DOWN
)
