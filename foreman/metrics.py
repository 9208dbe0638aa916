"""Prometheus metrics, kept per app (no process-wide registry), rendered by GET /metrics."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from foreman.job import Job, JobState, NewJob
from foreman.looplag import LoopLag

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._jobs = Counter(
            "foreman_jobs", "Jobs that ended, by final state.", ["endpoint", "model", "state"], registry=r
        )
        self._queue_depth = Gauge("foreman_queue_depth", "Jobs waiting, by model.", ["model"], registry=r)
        self._swaps = Counter("foreman_swaps", "Models loaded by the worker's swap step.", registry=r)
        self._load = Histogram(
            "foreman_model_load_seconds", "Time Ollama took to load a model.", buckets=_SECONDS, registry=r
        )
        self._wait = Histogram(
            "foreman_queue_wait_seconds", "Time from arrival to start, per job.", buckets=_SECONDS, registry=r
        )
        self._run = Histogram(
            "foreman_run_seconds", "Time from start to end, per job.", buckets=_SECONDS, registry=r
        )
        self._upstream_errors = Counter(
            "foreman_upstream_errors", "Failures talking to Ollama, by kind.", ["kind"], registry=r
        )
        self._stalls = Counter(
            "foreman_upstream_stalls",
            "Requests to Ollama given up because it sent nothing for FOREMAN_STALL_TIMEOUT.",
            registry=r,
        )
        self._retries = Counter(
            "foreman_retries", "Jobs put back in the queue after a transient failure.", registry=r
        )
        self.loop_lag = LoopLag()
        r.register(self.loop_lag)
        self._cache_lookups = Counter(
            "foreman_embed_cache_lookups",
            "Embedding inputs looked up in the cache, by result (hit or miss).",
            ["result"],
            registry=r,
        )
        self._cache_bytes = Gauge("foreman_embed_cache_bytes", "Bytes the embedding cache holds.", registry=r)
        self._cache_entries = Gauge(
            "foreman_embed_cache_entries", "Vectors the embedding cache holds.", registry=r
        )
        self._job_counters: dict[tuple[str, str, str], Counter] = {}
        self._embed_calls = Counter(
            "foreman_embed_calls", "Embed calls sent to Ollama by the worker.", registry=r
        )
        self._embed_jobs = Histogram(
            "foreman_embed_jobs_per_call",
            "Jobs one embed call to Ollama carried.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )

    def job_ended(
        self, job: Job | NewJob, state: JobState, *, wait: float | None = None, run: float | None = None
    ) -> None:
        """Count the job's end; `wait` and `run` are None for a job cancelled before it started (never timed)."""
        key = (job.endpoint, job.model_key, state.value)
        counter = self._job_counters.get(key)
        if counter is None:  # looked up once per label set: `labels` takes a lock and builds a key each time
            counter = self._job_counters[key] = self._jobs.labels(*key)
        counter.inc()
        if wait is not None:
            self._wait.observe(max(wait, 0.0))
        if run is not None:
            self._run.observe(max(run, 0.0))

    def swapped(self, load_seconds: float) -> None:
        self._swaps.inc()
        self._load.observe(load_seconds)

    def upstream_error(self, kind: str) -> None:
        self._upstream_errors.labels(kind).inc()

    def stalled(self) -> None:
        self._stalls.inc()

    def retried(self) -> None:
        self._retries.inc()

    def embed_cache_looked_up(self, hits: int, misses: int) -> None:
        self._cache_lookups.labels("hit").inc(hits)
        self._cache_lookups.labels("miss").inc(misses)

    def embed_called(self, jobs: int) -> None:
        self._embed_calls.inc()
        self._embed_jobs.observe(jobs)

    def render(
        self, waiting: Mapping[str, int], cache_entries: int | None = None, cache_bytes: int | None = None
    ) -> bytes:
        """The text exposition format, with the queue depth (`waiting` jobs per model key) as it is now."""
        if cache_entries is not None and cache_bytes is not None:
            self._cache_entries.set(cache_entries)
            self._cache_bytes.set(cache_bytes)
        self._queue_depth.clear()
        for model_key, count in waiting.items():
            self._queue_depth.labels(model_key).set(count)
        return bytes(generate_latest(self.registry))
