"""What a person or a monitor asks the daemon: /status, /healthz, /metrics."""

from __future__ import annotations

import dataclasses
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from foreman import __version__
from foreman.api import webhooks
from foreman.api.keys import CLOCK, CONFIG, EMBED_CACHE, METRICS, OUTAGES, RELAY, STORAGE, UPSTREAM, WORKER
from foreman.api.views import job_view
from foreman.durations import iso
from foreman.errors import UpstreamFailed, UpstreamRejected, UpstreamUnreachable
from foreman.storage import Storage

log = structlog.get_logger("foreman.status")

# /status must answer promptly even when Ollama hangs.
_PROBE_TIMEOUT = aiohttp.ClientTimeout(total=2)


async def status(request: web.Request) -> web.Response:
    """The daemon at a glance, for `curl | jq` and `foreman status`."""
    app = request.app
    store, worker = app[STORAGE], app[WORKER]
    reachable, ollama_models = await _probe_ollama(request)
    queues = await store.queues()
    waiting = {(q.model_key, q.priority): q for q in queues}
    now = app[CLOCK]()
    queue = [
        {
            "model": key,
            "priority": priority,
            "waiting": waiting[key, priority].queued,
            "oldest_job": waiting[key, priority].first[0],
            "oldest_at": iso(waiting[key, priority].first[1]),
        }
        for key, priority in worker.drain_order_now()(queues)
    ]
    running = [
        view for job_id in worker.running_jobs if (view := await _view(store, job_id, now)) is not None
    ]
    last_error = None
    # A job's failure, or Ollama not answering though no job has failed of it yet.
    errors = [error for error in (worker.last_error, app[OUTAGES].last_error) if error is not None]
    if errors:
        at, message = max(errors)
        last_error = {"message": message, "at": iso(at), "age_s": round(now - at, 1)}
    return web.json_response(
        {
            "version": __version__,
            "upstream": {"url": app[CONFIG].upstream, "reachable": reachable, "loaded": ollama_models},
            "resident": sorted(worker.resident),
            "running": running[0] if running else None,
            "in_flight": running,
            "models": [dataclasses.asdict(stats) for stats in worker.model_stats()],
            "queue": queue,
            "jobs": await store.counts_by_state(),
            "swaps": worker.swaps,
            "last_error": last_error,
            "db": await store.describe(),
            "nodes": await app[RELAY].nodes(),
            "embed_cache": await _embed_cache(app),
            "stalls": _stalls(app),
            "webhooks": webhooks.status_view(app),
        }
    )


def _stalls(app: web.Application) -> dict[str, Any]:
    """Requests Ollama accepted and then went silent on (FOREMAN_STALL_TIMEOUT), since start."""
    stalls = app[UPSTREAM].stalls
    if stalls is None:
        return {"total": 0, "in_a_row": 0, "last_at": None, "last_s": None, "restarts": 0, "timeout_s": None}
    last_at, last_s = stalls.last if stalls.last is not None else (None, None)
    return {
        "total": stalls.total,
        "in_a_row": stalls.in_a_row,
        "last_at": iso(last_at) if last_at is not None else None,
        "last_s": last_s,
        "restarts": stalls.restarts,
        "timeout_s": stalls.timeout or None,
    }


async def _embed_cache(app: web.Application) -> dict[str, Any] | None:
    """The embedding cache's counts since start and its size now; None when it is off."""
    cache = app[EMBED_CACHE]
    if cache is None:
        return None
    stats = await cache.stats()
    return {
        "hits": cache.hits,
        "misses": cache.misses,
        "entries": stats.entries,
        "bytes": stats.bytes,
        "limit_bytes": cache.limit,
    }


async def _view(store: Storage, job_id: str, now: float) -> dict[str, Any] | None:
    job = await store.get(job_id)
    return None if job is None else job_view(job, now)


async def healthz(request: web.Request) -> web.Response:
    """200 while the daemon and its database work, whether or not Ollama answers."""
    try:
        await request.app[STORAGE].ping()
    except Exception as exc:
        log.warning("health.failed", error=str(exc))
        return web.json_response({"error": f"database check failed: {exc}"}, status=503)
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    waiting = await request.app[STORAGE].waiting_by_model()
    cache = request.app[EMBED_CACHE]
    stats = await cache.stats() if cache is not None else None
    body = request.app[METRICS].render(
        waiting, stats.entries if stats else None, stats.bytes if stats else None
    )
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _probe_ollama(request: web.Request) -> tuple[bool, list[str]]:
    """Whether Ollama answers, and the models it holds."""
    try:
        return True, sorted(await request.app[UPSTREAM].resident_models(timeout=_PROBE_TIMEOUT))
    except (UpstreamFailed, UpstreamRejected):
        return True, []  # it answered, but not with a model list
    except UpstreamUnreachable:
        return False, []
