"""How jobs and times look in the API's JSON."""

from __future__ import annotations

import json
from typing import Any

from foreman.durations import iso
from foreman.job import Job, JobState
from foreman.ollama.names import is_cloud


def job_view(
    job: Job, now: float, *, position: int | None = None, with_result: bool = False
) -> dict[str, Any]:
    """A job as the API shows it at `now` (the app's clock, which stamped the job)."""
    view: dict[str, Any] = {
        "id": job.id,
        "state": job.state,
        "endpoint": job.endpoint,
        "model": job.model,
        "model_key": job.model_key,
        # For a job that named an alias or a route (docs/routing.md).
        **_routing(job),
        "async": job.respond_async,
        # A cloud model's job runs in the cloud lane, beside the GPU's drain (worker/cloud_lane.py).
        "lane": "cloud" if is_cloud(job.model_key) else "local",
        "attempt": job.attempt,
        "position": position,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "queue_wait_s": _round(job.queue_wait if job.queue_wait is not None else now - job.created_at),
        "run_s": _round(job.run_time if job.finished_at is not None else _since(job.started_at, now)),
        "status": job.status,
        "error": job.error,
        # After a failure: the job waits until then while the worker serves others.
        "not_before": iso(job.not_before) if job.state is JobState.QUEUED else None,
    }
    if job.cache is not None:
        view["cache"] = (
            job.cache
        )  # embeddings: "hit", "partial" (served from the cache) or "no-cache" (asked)
    if with_result:
        view["result"] = _result(job.result) if job.state is JobState.DONE and job.result else None
    return view


def _result(result: bytes) -> Any:
    """A result as JSON, or as the text it is (a transcription asked for `response_format=text`)."""
    try:
        return json.loads(result)
    except ValueError:
        return result.decode("utf-8", "replace")


def _routing(job: Job) -> dict[str, Any]:
    routing = json.loads(job.routing) if job.routing else {}
    return {
        "alias": routing.get("alias"),
        "route": routing.get("route"),
        "served_model": job.served_model,
    }


def _since(start: float | None, now: float) -> float | None:
    return None if start is None else now - start


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(max(seconds, 0.0), 3)
