"""`foreman serve`: the daemon as systemd or a terminal runs it."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Sequence

import structlog
import uvloop
from aiohttp import web

from foreman import log as logging_setup
from foreman.api.security import is_loopback
from foreman.app import create_app
from foreman.config import EXIT_CONFIG, Config, redact_url
from foreman.errors import StoreError, StoreUnreachable
from foreman.routing.routes_file import RoutesError

log = structlog.get_logger("foreman")


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """uvloop's loop or the standard library's (`FOREMAN_LOOP`)."""
    if kind == "uvloop":
        # libuv's loop: its scheduling, polling and transports cost a fraction of asyncio's in CPython.
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def with_gc_frozen_after_start(app: web.Application) -> web.Application:
    """`app`, which moves what exists once it has started out of the garbage collector's sight.

    A full collection walks every tracked object: the 45,000 or so that
    imports and start-up leave take it 15 ms, during which the event loop
    runs nothing. Frozen, they are never walked again; the daemon's own
    garbage is collected as before.
    """

    async def freeze(app: web.Application) -> None:
        gc.collect()
        gc.freeze()

    app.on_startup.append(freeze)  # after the cleanup contexts, which on_startup runs first
    return app


def serve(config: Config, unknown: Sequence[tuple[str, str | None]] = ()) -> int:
    """Run until SIGINT or SIGTERM; returns the process exit code.

    `unknown` lists the FOREMAN_* variables that are no setting, each with the
    nearest one: a line each says so, and foreman starts anyway.
    """
    logging_setup.configure(config.log_format, config.log_level, cache=True)
    log.info(
        "foreman.start",
        listen=f"{config.host}:{config.port}",
        upstream=config.upstream,
        db=redact_url(config.db_url) if config.db_url is not None else str(config.db_path),
    )
    for variable, nearest in unknown:
        log.warning("foreman.unknown_variable", variable=variable, did_you_mean=nearest, ignored=True)
    if not is_loopback(config.host) and not config.token:
        log.warning(
            "foreman.exposed",
            listen=config.host,
            hint="anyone who can reach this address can use your GPU; set FOREMAN_TOKEN or bind 127.0.0.1",
        )
    try:
        web.run_app(
            with_gc_frozen_after_start(create_app(config)),
            host=config.host,
            port=config.port,
            # A client that disconnects must cancel its job, as it does in Ollama.
            handler_cancellation=True,
            # Handlers still open after the worker's grace period are only
            # finishing replies or being told 503; they need little time.
            shutdown_timeout=10,
            print=None,
            access_log=None,
            loop=new_event_loop(config.loop),
        )
    except StoreUnreachable as exc:
        # Not a bad setting: the server may be starting too. systemd tries again (Restart=on-failure).
        log.error("foreman.db_unreachable", error=str(exc))
        return 1
    except StoreError as exc:
        log.error("foreman.db_refused", error=str(exc))
        return EXIT_CONFIG
    except RoutesError as exc:
        log.error("foreman.routes_refused", error=str(exc))
        return EXIT_CONFIG
    except OSError as exc:
        log.error("foreman.listen_failed", listen=f"{config.host}:{config.port}", error=str(exc))
        return 1
    log.info("foreman.stopped")
    return 0
