"""The queued endpoints: each request becomes a job, and the handler waits for it."""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web

from foreman.events import Chunk, Ended, JobEvent
from foreman.intake import parse_job, parse_priority
from foreman.keys import CLOCK, CONFIG, EVENTS, STORE, WORKER
from foreman.models import JobState, NewJob
from foreman.upstream import NDJSON

log = structlog.get_logger("foreman.api")

JOB_HEADER = "X-Foreman-Job"
PRIORITY_HEADER = "X-Foreman-Priority"


async def queued(request: web.Request) -> web.StreamResponse:
    """Write the request as a job, then answer with what the worker produces for it."""
    app = request.app
    priority = parse_priority(request.headers.get(PRIORITY_HEADER), app[CONFIG].sync_priority)
    job = parse_job(request.path, await request.read(), app[CLOCK](), priority=priority)
    worker = app[WORKER]
    with app[EVENTS].subscribe(job.id) as inbox:
        try:
            # Shielded: once the insert started, it lands even if the client
            # leaves, and the cancel below then finds the job.
            await asyncio.shield(app[STORE].insert(job))
            worker.wake()
            log.info(
                "job.queued",
                model=job.model_key,
                job_id=job.id,
                endpoint=job.endpoint,
                stream=job.stream,
                priority=job.priority.value,
            )
            return await _respond(request, job, inbox, app[CONFIG].early_headers)
        except (asyncio.CancelledError, ConnectionResetError):
            # The client went away: like Ollama, stop working for it.
            await asyncio.shield(worker.cancel(job.id))
            raise


async def _respond(
    request: web.Request, job: NewJob, inbox: asyncio.Queue[JobEvent], early_headers: float
) -> web.StreamResponse:
    stream: web.StreamResponse | None = None
    while True:
        if stream is None and job.stream:
            try:
                event = await asyncio.wait_for(inbox.get(), early_headers)
            except TimeoutError:
                stream = await _start_stream(request, job)
                continue
        else:
            event = await inbox.get()
        if isinstance(event, Chunk):
            if stream is None:
                stream = await _start_stream(request, job)
            await stream.write(event.data)
            continue
        return await _finish(request, job, stream, event)


async def _start_stream(request: web.Request, job: NewJob) -> web.StreamResponse:
    stream = web.StreamResponse(headers={"Content-Type": NDJSON, JOB_HEADER: job.id})
    await stream.prepare(request)
    return stream


async def _finish(
    request: web.Request, job: NewJob, stream: web.StreamResponse | None, ended: Ended
) -> web.StreamResponse:
    if stream is None:
        return web.Response(
            status=ended.status,
            body=ended.body,
            headers={"Content-Type": ended.content_type, JOB_HEADER: job.id},
        )
    if ended.body:
        # Headers are gone: like Ollama, report a late failure as the last line.
        await stream.write(ended.body.rstrip(b"\n") + b"\n")
    await stream.write_eof()
    return stream


# What handlers still waiting at shutdown tell their clients.
SHUTTING_DOWN = Ended(
    JobState.QUEUED,
    503,
    b'{"error":"foreman is shutting down; the job stays queued and runs after the restart"}',
)
