"""foreman's settings: one frozen value built from flags and FOREMAN_* variables."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from foreman.intake import is_keep_alive
from foreman.models import Priority

DEFAULT_PORT = 11435
OLLAMA_PORT = 11434


@dataclass(frozen=True, slots=True)
class Config:
    db_path: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    upstream: str = f"http://127.0.0.1:{OLLAMA_PORT}"
    log_format: str = "console"
    log_level: str = "info"
    max_attempts: int = 8
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    # keep_alive values as sent to Ollama: a number of seconds or a duration string.
    pin_keep_alive: float | str = -1
    release_keep_alive: float | str = "5m"
    max_body: int = 32 * 1024 * 1024
    # A streaming client that has waited this long in the queue gets its 200
    # and NDJSON headers at once, so clients with a headers timeout (Node's
    # fetch gives up after 300 s) keep waiting.
    early_headers: float = 60.0
    # Finished jobs and their output are deleted this many seconds after they end.
    retention: float = 7 * 24 * 3600.0
    sync: str = "normal"  # "full": an fsync per commit, so power loss cannot undo one
    loop: str = "uvloop"  # the event loop: uvloop or asyncio
    max_queue: int = 100_000  # waiting jobs; beyond it new ones get 503
    token: str | None = None  # when set, every endpoint but /healthz needs it as a bearer token
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted beside the bind address and localhost
    origins: tuple[str, ...] = ()  # browser origins allowed beside Ollama's defaults
    read_timeout: float = 60.0  # seconds a client may take to send its request body
    shutdown_grace: float = 30.0  # seconds running jobs get to finish on SIGTERM before they are requeued
    # Scheduling (README, "Scheduling"): the wait bound, the least time a
    # loaded model stays before the bound may swap it away, and how many jobs
    # of the one loaded model may run at once.
    max_wait: float = 600.0
    min_residency: float = 0.0
    parallel: int = 1
    sync_priority: Priority = Priority.INTERACTIVE  # class of a request without X-Foreman-Priority
    async_priority: Priority = Priority.BATCH  # class of an async submission without X-Foreman-Priority
    warm: str = "auto"  # read the next model's blob into the page cache: auto (when readable) or off


def parse_listen(value: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """`host:port`, `host`, `:port` or `http://host:port`, as OLLAMA_HOST takes them."""
    value = value.strip().strip("\"'")
    if "://" not in value:
        value = "http://" + value
    parts = urlsplit(value)
    if parts.scheme != "http":
        raise ValueError(f"unsupported scheme {parts.scheme!r} in {value!r}: foreman serves plain http")
    try:
        port = parts.port or default_port
    except ValueError as exc:
        raise ValueError(f"bad port in {value!r}") from exc
    # Like Ollama, ":port" alone means every interface.
    host = parts.hostname or "0.0.0.0"
    return host, port


def client_url(value: str, default_port: int = DEFAULT_PORT) -> str:
    """The base URL a client uses for an OLLAMA_HOST-style address.

    A wildcard host (`0.0.0.0`, `::`, or none as in `:port`) is where a server
    listens; a client on the same machine reaches it on the loopback address.
    """
    host, port = parse_listen(value, default_port)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{_bracket(host)}:{port}"


def parse_upstream(value: str) -> str:
    """Ollama's base URL from a URL or an OLLAMA_HOST-style address."""
    value = value.strip().strip("\"'")
    if "://" not in value:
        value = client_url(value, OLLAMA_PORT)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {value!r}")
    return value.rstrip("/")


def parse_keep_alive(value: str) -> float | str:
    """A keep_alive setting as Ollama's request field takes it: `-1` → -1, `24h` → "24h"."""
    try:
        number = json.loads(value)
    except ValueError:
        number = None
    if isinstance(number, int | float) and not isinstance(number, bool):
        return number
    if not is_keep_alive(value):
        raise ValueError(f"not a keep_alive: {value!r} (use seconds like -1 or 300, or a duration like 24h)")
    return value


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str) -> float:
    """Seconds from `90`, `30s`, `15m`, `12h` or `7d`."""
    text = value.strip().lower()
    scale = _UNITS.get(text[-1:])
    number = text[:-1] if scale is not None else text
    try:
        seconds = float(number) * (scale or 1)
    except ValueError as exc:
        raise ValueError(f"not a duration: {value!r} (use seconds, or a number with s, m, h or d)") from exc
    if seconds <= 0:
        raise ValueError(f"must be positive, got {value!r}")
    return seconds


def default_db_path(environ: Mapping[str, str]) -> Path:
    """systemd's StateDirectory when it set one, else the XDG state directory."""
    state_directory = environ.get("STATE_DIRECTORY")
    if state_directory:
        return Path(state_directory.split(":")[0]) / "foreman.db"
    xdg = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "foreman" / "foreman.db"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
