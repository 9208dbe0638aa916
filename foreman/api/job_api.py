"""The job API: look at jobs, follow their events, cancel them."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from foreman.api.keys import CLOCK, EVENTS, QUEUE, ROUTES, STORAGE
from foreman.api.views import job_view
from foreman.durations import iso as _iso
from foreman.errors import BadRequest, Conflict, NotFound
from foreman.job import MAX_PAGE, Job, JobState
from foreman.ollama.names import normalise_model
from foreman.queue.job_events import Chunk, Ended, StateChanged
from foreman.routing.aliases import ALIAS_MARK

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


async def get_job(request: web.Request) -> web.Response:
    job = await _job_or_404(request)
    position = await request.app[QUEUE].position(job) if job.state is JobState.QUEUED else None
    return web.json_response(job_view(job, request.app[CLOCK](), position=position, with_result=True))


def _filter_key(request: web.Request, model: str) -> str:
    """What `?model=` matches: a model's groups, or every job of an alias."""
    alias = request.app[ROUTES].current.aliases.get(normalise_model(model))
    return f"{ALIAS_MARK}{alias.name}" if alias is not None else normalise_model(model)


async def list_jobs(request: web.Request) -> web.Response:
    """A page of jobs, newest first; `next` is the cursor for the following page."""
    query = request.query
    state = query.get("state")
    if state is not None and state not in JobState.__members__.values():
        raise BadRequest(f"unknown state {state!r}: use one of {', '.join(s.value for s in JobState)}")
    try:
        limit = int(query.get("limit", "50"))
    except ValueError as exc:
        raise BadRequest("limit must be a whole number") from exc
    if not 1 <= limit <= MAX_PAGE:
        raise BadRequest(f"limit must be between 1 and {MAX_PAGE}")
    model = query.get("model")
    jobs = await request.app[STORAGE].list_jobs(
        state=JobState(state) if state is not None else None,
        model_key=_filter_key(request, model) if model else None,
        limit=limit,
        before=query.get("after"),
    )
    now = request.app[CLOCK]()
    return web.json_response(
        {
            "jobs": [job_view(job, now) for job in jobs],
            "next": jobs[-1].id if len(jobs) == limit else None,
        }
    )


async def cancel_job(request: web.Request) -> web.Response:
    """Cancel a queued job or abort a running one; 409 once it has ended."""
    app = request.app
    job = await _job_or_404(request)
    if job.state.terminal:
        raise Conflict(f"job {job.id} already ended ({job.state})")
    with app[EVENTS].subscribe(job.id, client=False) as inbox:
        if not await app[QUEUE].cancel(job.id):
            raise Conflict(f"job {job.id} ended before it could be cancelled")
        while not isinstance(await inbox.get(), Ended):
            pass
    ended = await _job_or_404(request)
    return web.json_response(job_view(ended, app[CLOCK]()))


async def job_events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: the job's history so far, then its live tail until it ends."""
    app = request.app
    job_id = request.match_info["id"]
    with app[EVENTS].subscribe(job_id, client=False) as inbox:
        # Taken in the same step as the subscription: no chunk is missed or doubled.
        so_far = app[QUEUE].output_so_far(job_id)
        job = await _job_or_404(request)
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        await _send_state(response, JobState.QUEUED, 0, job.created_at)
        if job.state.terminal:
            # Replay: the row's times stand for the state changes; the chunks were kept.
            if job.started_at is not None:
                await _send_state(response, JobState.WORKING, job.attempt, job.started_at)
            for data in await app[STORAGE].chunks(job_id):
                await _send_chunk(response, data)
            await _send(response, "end", _end_view(job.state, job.status, job.error, job.finished_at))
            return response
        if job.state is not JobState.QUEUED:
            await _send_state(response, job.state, job.attempt, job.started_at)
        for data in so_far:
            await _send_chunk(response, data)
        while True:
            event = await inbox.get()
            if isinstance(event, Chunk):
                await _send_chunk(response, event.data)
            elif isinstance(event, StateChanged):
                await _send_state(response, event.state, event.attempt, app[CLOCK]())
            else:
                await _send(response, "end", _end_view(event.state, event.status, event.error, app[CLOCK]()))
                return response


async def _job_or_404(request: web.Request) -> Job:
    job_id = request.match_info["id"]
    job = await request.app[STORAGE].get(job_id)
    if job is None:
        raise NotFound(f"job {job_id!r} not found")
    return job


async def _send(response: web.StreamResponse, event: str, data: dict[str, Any]) -> None:
    await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())


async def _send_state(response: web.StreamResponse, state: JobState, attempt: int, at: float | None) -> None:
    await _send(response, "state", {"state": state, "attempt": attempt, "at": _iso(at)})


async def _send_chunk(response: web.StreamResponse, line: bytes) -> None:
    await response.write(b"event: chunk\ndata: " + line.rstrip(b"\n") + b"\n\n")


def _end_view(state: JobState, status: int | None, error: str | None, at: float | None) -> dict[str, Any]:
    return {"state": state, "status": status, "error": error, "at": _iso(at)}
