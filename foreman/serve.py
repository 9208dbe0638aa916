"""`foreman serve`: the daemon as systemd or a terminal runs it."""

from __future__ import annotations

import structlog
from aiohttp import web

from foreman import log as logging_setup
from foreman.app import create_app
from foreman.config import EXIT_CONFIG, Config, redact_url
from foreman.errors import StoreError, StoreUnreachable
from foreman.routes import RoutesError
from foreman.security import is_loopback

log = structlog.get_logger("foreman")


def serve(config: Config) -> int:
    """Run until SIGINT or SIGTERM; returns the process exit code."""
    logging_setup.configure(config.log_format, config.log_level)
    log.info(
        "foreman.start",
        listen=f"{config.host}:{config.port}",
        upstream=config.upstream,
        db=redact_url(config.db_url) if config.db_url is not None else str(config.db_path),
    )
    if not is_loopback(config.host) and not config.token:
        log.warning(
            "foreman.exposed",
            listen=config.host,
            hint="anyone who can reach this address can use your GPU; set FOREMAN_TOKEN or bind 127.0.0.1",
        )
    try:
        web.run_app(
            create_app(config),
            host=config.host,
            port=config.port,
            # A client that disconnects must cancel its job, as it does in Ollama.
            handler_cancellation=True,
            # Handlers still open after the worker's grace period are only
            # finishing replies or being told 503; they need little time.
            shutdown_timeout=10,
            print=None,
            access_log=None,
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
