"""`foreman serve`: the daemon as systemd or a terminal runs it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
from collections.abc import Sequence

import structlog
import uvloop
from aiohttp import web

from foreman import log as logging_setup
from foreman.api.security import is_loopback
from foreman.app import create_app
from foreman.config import EXIT_CONFIG, Config
from foreman.errors import StoreBusy, StoreError, StoreUnreachable
from foreman.routing.routes_file import RoutesError
from foreman.setting_values import redact_url
from foreman.storage.sqlite.lock import QueueLock

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


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address `host` names, as aiohttp's own site would open them.

    foreman binds before it opens its database: a port that is taken stops it
    before it has recovered (or touched) a single job. The sockets listen only
    once foreman has started (aiohttp's site calls listen), so until then a
    client is refused, not left waiting, and `foreman.ready` follows.
    """
    infos = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_ADDRCONFIG
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # As asyncio does: the IPv6 socket must not also claim the IPv4 port.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _where(config: Config) -> str:
    return redact_url(config.db_url) if config.db_url is not None else str(config.db_path)


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
        db=_where(config),
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
        if config.db_url is None:
            # The database before the port: a second daemon says who holds the database.
            QueueLock.reserve(config.db_file)
        sockets = bind(config.host, config.port)
    except StoreBusy as exc:
        log.error("foreman.db_busy", error=str(exc))
        return 1
    except StoreError as exc:
        log.error("foreman.db_refused", error=str(exc))
        return EXIT_CONFIG
    except OSError as exc:
        log.error("foreman.listen_failed", listen=f"{config.host}:{config.port}", error=str(exc))
        return 1
    try:
        web.run_app(
            with_gc_frozen_after_start(create_app(config)),
            sock=sockets,
            # A client that disconnects must cancel its job, as it does in Ollama.
            handler_cancellation=True,
            # Handlers still open after the worker's grace period are only
            # finishing replies or being told 503; they need little time.
            shutdown_timeout=10,
            # Called once every socket listens: only then can a client connect.
            print=lambda _: log.info(
                "foreman.ready",
                listen=f"{config.host}:{config.port}",
                upstream=config.upstream,
                db=_where(config),
            ),
            access_log=None,
            loop=new_event_loop(config.loop),
        )
    except StoreBusy as exc:
        # Another daemon serves this database: running beside it would run jobs twice.
        # Not a bad setting either: systemd tries again, and gets it once that one stops.
        log.error("foreman.db_busy", error=str(exc))
        return 1
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
    finally:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
    log.info("foreman.stopped")
    return 0
