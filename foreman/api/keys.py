"""Typed slots on the aiohttp application, so modules share them without importing each other."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from foreman.config import Config
from foreman.embeddings.cache import EmbedCache
from foreman.metrics import Metrics
from foreman.ollama.client import Upstream
from foreman.ollama.outages import Outages
from foreman.ollama.tags import ModelTags
from foreman.queue.front import QueueFront
from foreman.queue.job_events import JobEvents
from foreman.queue.page_feed import PageFeed
from foreman.routing.table import RouteTable
from foreman.storage import Storage
from foreman.storage.batches import BatchStore
from foreman.storage.relay import Relay
from foreman.worker.cloud_lane import CloudLane
from foreman.worker.loop import Worker

# The Files and Batch APIs' tables and the webhook outbox, opened with STORAGE.
BATCH_STORE: web.AppKey[BatchStore] = web.AppKey("batch_store")
# The clock jobs are stamped and scheduled by: time.time, or a fake one in tests.
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")
CONFIG = web.AppKey("config", Config)
CLOUD_LANE = web.AppKey("cloud_lane", CloudLane)
# None when FOREMAN_EMBED_CACHE=0.
EMBED_CACHE: web.AppKey[EmbedCache | None] = web.AppKey("embed_cache")
EVENTS = web.AppKey("events", JobEvents)
PAGE_FEED = web.AppKey("feed", PageFeed)
METRICS = web.AppKey("metrics", Metrics)
MODEL_TAGS = web.AppKey("model_tags", ModelTags)
OUTAGES = web.AppKey("outages", Outages)
# What the handlers submit, cancel and follow jobs through.
QUEUE = web.AppKey("queue", QueueFront)
# The line to the other nodes sharing the queue: `ALONE` for a node alone.
RELAY: web.AppKey[Relay] = web.AppKey("relay")
ROUTES = web.AppKey("routes", RouteTable)
STORAGE: web.AppKey[Storage] = web.AppKey("store")
UPSTREAM = web.AppKey("upstream", Upstream)
WORKER = web.AppKey("worker", Worker)
