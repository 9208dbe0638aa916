"""The one place where foreman is assembled."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import structlog
from aiohttp import web

from foreman import ui
from foreman.api import (
    batches,
    error_shape,
    files,
    inference,
    job_api,
    model_lists,
    passthrough,
    security,
    status,
    webhooks,
)
from foreman.api.keys import (
    BATCH_STORE,
    CLOCK,
    CLOUD_LANE,
    CONFIG,
    EMBED_CACHE,
    EVENTS,
    METRICS,
    MODEL_TAGS,
    OUTAGES,
    PAGE_FEED,
    QUEUE,
    RELAY,
    ROUTES,
    STORAGE,
    UPSTREAM,
    WORKER,
)
from foreman.background import running
from foreman.config import Config
from foreman.embeddings.batch import EmbedBatcher
from foreman.embeddings.cache import EmbedCache
from foreman.job import QUEUED_ENDPOINTS
from foreman.metrics import Metrics
from foreman.ollama.client import Upstream
from foreman.ollama.outages import Outages
from foreman.ollama.stalls import Stalls
from foreman.ollama.tags import ModelTags
from foreman.queue.front import QueueFront
from foreman.queue.job_events import JobEvents
from foreman.queue.lifecycle import Lifecycle
from foreman.queue.page_feed import PageFeed
from foreman.queue.retention import prune_forever
from foreman.retry import RetryPolicy, Sleep
from foreman.routing.table import RouteTable
from foreman.scheduling.driver import PolicyDriver
from foreman.scheduling.policy import Policy
from foreman.setting_values import redact_url
from foreman.storage import backends
from foreman.worker.cloud_lane import CloudLane, Lanes
from foreman.worker.loop import Worker
from foreman.worker.residency import Residency
from foreman.worker.runner import JobRunner
from foreman.worker.swap import Swap
from foreman.worker.wakeups import WakeUps
from foreman.worker.warm import Warmer

log = structlog.get_logger("foreman")


def create_app(
    config: Config,
    *,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Sleep = asyncio.sleep,
) -> web.Application:
    """foreman as an aiohttp application; nothing starts until the app does.

    `clock` stamps and schedules jobs, `monotonic` times loads, runs and idle
    spells, `sleep` waits out backoffs: tests hand in fakes.
    """
    app = web.Application(
        client_max_size=config.max_body,
        middlewares=[error_shape.errors],
        # Bodies stay as they came: passed through byte for byte, decoded for jobs (api/request_body.py).
        handler_args={"auto_decompress": False},
    )
    # In Ollama's order: CORS first (it answers preflights itself), then the Host guard.
    security.cors(app, config.origins)
    if security.is_loopback(config.host):
        # DNS rebinding only threatens a server that trusts "local" callers.
        app.middlewares.append(security.host_guard(config.allowed_hosts))
    if config.token:
        app.middlewares.append(security.bearer_token(config.token, public=ui.PUBLIC_PATHS))
    app.middlewares.append(webhooks.job_webhooks)
    app[CONFIG] = config
    app[CLOCK] = clock
    app[PAGE_FEED] = PageFeed()
    app[METRICS] = Metrics()
    app[ROUTES] = RouteTable(config.routes)

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        async with backends.opened(config, clock=clock) as (store, relay, batch_store):
            requeued, failed = await store.recover(clock(), config.max_attempts)
            if requeued or failed:
                log.info("queue.recovered", requeued=requeued, failed=failed, db=_where(config))
            app[STORAGE], app[RELAY], app[EVENTS] = store, relay, JobEvents(relay)
            app[BATCH_STORE] = batch_store
            yield

    async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
        # No total timeout: a cold load of a big model can take minutes, and
        # Ollama aborts a load whose client gave up.
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
        )
        stalls = Stalls(
            config.stall_timeout,
            restart_command=config.ollama_restart,
            restart_after=config.restart_after_stalls,
            on_stall=app[METRICS].stalled,
        )
        app[UPSTREAM] = Upstream(session, config.upstream, stalls)
        yield
        await stalls.close()
        await session.close()

    async def routes_ctx(app: web.Application) -> AsyncIterator[None]:
        # A routes file that is wrong stops foreman here (RoutesError), before anything started.
        async with app[ROUTES].running(config.upstream, lambda: app[UPSTREAM]):
            yield

    async def embed_cache_ctx(app: web.Application) -> AsyncIterator[None]:
        cache = None
        tags = ModelTags(app[UPSTREAM])
        if config.embed_cache > 0:
            cache = EmbedCache(app[STORAGE], tags, config.embed_cache, app[METRICS])
            tags.on_change = cache.invalidate
            # FOREMAN_EMBED_CACHE may have shrunk since the last run.
            await app[STORAGE].cache_evict(config.embed_cache)
        app[MODEL_TAGS], app[EMBED_CACHE] = tags, cache
        if cache is None:
            yield
            return
        async with running(tags.refresh_forever(config.cache_refresh, sleep), "foreman-model-tags"):
            yield
        await cache.close()

    async def worker_ctx(app: web.Application) -> AsyncIterator[None]:
        store, upstream, metrics, feed = app[STORAGE], app[UPSTREAM], app[METRICS], app[PAGE_FEED]
        retry = RetryPolicy(config.max_attempts, config.backoff_initial, config.backoff_max)
        driver = PolicyDriver(Policy(max_wait=config.max_wait, min_residency=config.min_residency))
        outages = Outages(upstream.base_url, clock)
        app[OUTAGES] = outages
        residency = Residency(
            upstream,
            outages,
            pin_keep_alive=config.pin_keep_alive,
            release_keep_alive=config.release_keep_alive,
            ledger=store,
        )
        # Pins a daemon killed with -9 left behind: released unless work waits for their models.
        await residency.restore_pins(await store.waiting_by_model())
        wakeups = WakeUps()
        lifecycle = Lifecycle(
            store=store, events=app[EVENTS], feed=feed, metrics=metrics, clock=clock, cache=app[EMBED_CACHE]
        )
        swap = Swap(
            store=store,
            lifecycle=lifecycle,
            residency=residency,
            driver=driver,
            wakeups=wakeups,
            metrics=metrics,
            feed=feed,
            clock=clock,
            monotonic=monotonic,
        )
        runner = JobRunner(
            upstream=upstream,
            lifecycle=lifecycle,
            swap=swap,
            residency=residency,
            driver=driver,
            outages=outages,
            retry=retry,
            embeds=EmbedBatcher(
                store=store,
                upstream=upstream,
                metrics=metrics,
                max_inputs=config.embed_batch,
                cache=app[EMBED_CACHE],
            ),
            clock=clock,
            monotonic=monotonic,
            sleep=sleep,
        )
        worker = Worker(
            store=store,
            lifecycle=lifecycle,
            driver=driver,
            residency=residency,
            runner=runner,
            retry=retry,
            wakeups=wakeups,
            parallel=config.parallel,
            warmer=Warmer(upstream) if config.warm == "auto" else None,
            clock=clock,
            monotonic=monotonic,
            sleep=sleep,
        )
        app[WORKER] = worker
        # Jobs for cloud models run beside the worker, on the same runner (worker/cloud_lane.py).
        cloud = app[CLOUD_LANE] = CloudLane(
            store=store, runner=runner, parallel=config.cloud_parallel, clock=clock
        )
        app[QUEUE] = QueueFront(store, lifecycle, Lanes(worker, cloud))
        async with (
            running(worker.run(), "foreman-worker"),
            running(cloud.run(), "foreman-cloud-lane"),
            app[RELAY].joined(worker, app[EVENTS], outages),
        ):
            yield
        await residency.flush_pins()  # the releases of the stop, recorded before the store closes

    async def loop_lag_ctx(app: web.Application) -> AsyncIterator[None]:
        lag = app[METRICS].loop_lag
        lag.start()
        yield
        lag.stop()

    async def retention_ctx(app: web.Application) -> AsyncIterator[None]:
        async with running(
            prune_forever(app[STORAGE], app[BATCH_STORE], config.retention, clock, sleep), "foreman-prune"
        ):
            yield

    async def stop_gracefully(app: web.Application) -> None:
        # The listener is closed already. Clients of queued jobs hear at once
        # that their job waits for the restart; running jobs get the grace
        # time to finish for the clients waiting on them.
        worker, cloud = app[WORKER], app[CLOUD_LANE]
        worker.stop()
        cloud.stop()
        app[PAGE_FEED].close()
        # The runner is shared: its running jobs are the worker's and the cloud lane's.
        app[EVENTS].end_all(inference.SHUTTING_DOWN, sparing=worker.running_jobs)
        await asyncio.gather(
            worker.wait_for_running(config.shutdown_grace), cloud.wait_for_running(config.shutdown_grace)
        )
        app[EVENTS].end_all(inference.SHUTTING_DOWN)

    # Torn down in reverse: the worker stops before the session and the store close.
    app.cleanup_ctx.extend(
        [
            loop_lag_ctx,
            routes_ctx,
            store_ctx,
            upstream_ctx,
            embed_cache_ctx,
            batches.store_ctx,
            worker_ctx,
            retention_ctx,
            batches.run_ctx,
            webhooks.ctx,
        ]
    )
    app.on_shutdown.append(stop_gracefully)
    for endpoint in QUEUED_ENDPOINTS:
        app.router.add_post(endpoint, inference.handle)
    app.router.add_get("/jobs", job_api.list_jobs)
    app.router.add_get("/jobs/{id}", job_api.get_job)
    app.router.add_delete("/jobs/{id}", job_api.cancel_job)
    app.router.add_get("/jobs/{id}/events", job_api.job_events)
    app.router.add_get("/status", status.status)
    app.router.add_get("/healthz", status.healthz)
    app.router.add_get("/metrics", status.metrics)
    app.router.add_get("/api/tags", model_lists.tags)
    app.router.add_post("/api/show", model_lists.show)
    app.router.add_get("/v1/models", model_lists.openai_models, allow_head=False)
    app.router.add_get("/v1/models/{model}", model_lists.openai_model, allow_head=False)
    files.setup(app)
    batches.setup(app)
    ui.setup(app)
    app.router.add_route("*", "/{tail:.*}", passthrough.passthrough)
    return app


def _where(config: Config) -> str:
    return redact_url(config.db_url) if config.db_url is not None else str(config.db_path)
