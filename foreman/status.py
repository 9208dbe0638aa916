"""What a person or a monitor asks the daemon: /status, /healthz, /metrics."""

from __future__ import annotations

import json
import time

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from foreman import __version__
from foreman.keys import CONFIG, METRICS, STORE, UPSTREAM, WORKER
from foreman.names import normalise_model
from foreman.scheduler import drain_order
from foreman.store import Store
from foreman.views import iso, job_view

log = structlog.get_logger("foreman.status")

# /status must answer promptly even when Ollama hangs.
_PROBE_TIMEOUT = aiohttp.ClientTimeout(total=2)


async def status(request: web.Request) -> web.Response:
    """The daemon at a glance, for `curl | jq` and `foreman status`."""
    app = request.app
    store, worker = app[STORE], app[WORKER]
    reachable, ollama_models = await _probe_ollama(request)
    queues = await store.run(Store.queues)
    waiting = {q.model_key: q for q in queues}
    now = time.time()
    queue = [
        {"model": key, "waiting": waiting[key].waiting, "oldest_job": waiting[key].oldest_id}
        for key in drain_order(queues, worker.resident)
    ]
    running = None
    if (job_id := worker.running_job) is not None and (job := await store.run(Store.get, job_id)) is not None:
        running = job_view(job)
    last_error = None
    if worker.last_error is not None:
        at, message = worker.last_error
        last_error = {"message": message, "at": iso(at), "age_s": round(now - at, 1)}
    return web.json_response(
        {
            "version": __version__,
            "upstream": {"url": app[CONFIG].upstream, "reachable": reachable, "loaded": ollama_models},
            "resident": sorted(worker.resident),
            "running": running,
            "queue": queue,
            "jobs": await store.run(Store.counts_by_state),
            "swaps": worker.swaps,
            "last_error": last_error,
            "db": {"path": str(app[CONFIG].db_path), "size_bytes": await store.run(Store.size_bytes)},
        }
    )


async def healthz(request: web.Request) -> web.Response:
    """200 while the daemon and its database work, whether or not Ollama answers."""
    try:
        await request.app[STORE].run(Store.ping)
    except Exception as exc:
        log.warning("health.failed", error=str(exc))
        return web.json_response({"error": f"database check failed: {exc}"}, status=503)
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    queues = await request.app[STORE].run(Store.queues)
    return web.Response(
        body=request.app[METRICS].render(queues), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def _probe_ollama(request: web.Request) -> tuple[bool, list[str]]:
    upstream = request.app[UPSTREAM]
    try:
        async with upstream.session.get(upstream.url("/api/ps"), timeout=_PROBE_TIMEOUT) as response:
            body = json.loads(await response.read())
        return True, sorted(normalise_model(m["name"]) for m in body.get("models") or [])
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError, AttributeError):
        return False, []
