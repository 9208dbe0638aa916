"""Setting values as a person writes them: text from a flag or a variable → the value `Config` holds.

Each parser raises ValueError with words a person can act on; `foreman.config`
names the flag and the variable in front of them.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from foreman.durations import is_keep_alive
from foreman.job import Priority

DEFAULT_PORT = 11435
OLLAMA_PORT = 11434


class Address(NamedTuple):
    host: str
    port: int


# ---- parsers: text from a flag or a variable → the value Config holds; ValueError says why not


def parse_listen(value: str, default_port: int = DEFAULT_PORT) -> Address:
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
    return Address(host, port)


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


def optional_keep_alive(value: str) -> float | str | None:
    """A keep_alive setting, or None when it is empty."""
    return parse_keep_alive(value) if value.strip() else None


# The schemes an origin without a wildcard may have (gin-contrib/cors with
# AllowBrowserExtensions, as Ollama sets it). It only decides which
# OLLAMA_ORIGINS entries Ollama starts with: a browser extension is still
# refused until its origin is listed (Ollama's FAQ, "allow additional web origins").
_ORIGIN_SCHEMES = (
    "http://",
    "https://",
    "chrome-extension://",
    "safari-extension://",
    "moz-extension://",
    "ms-browser-extension://",
)


def origin_list(value: str) -> tuple[str, ...]:
    """Comma-separated CORS origins, refused where Ollama would refuse to start with them (gin-contrib/cors)."""
    listed = names(value)
    for origin in listed:
        if origin.count("*") > 1:
            raise ValueError(f"{origin!r}: only one * is allowed")
        if "*" not in origin and not origin.startswith(_ORIGIN_SCHEMES):
            raise ValueError(
                f"{origin!r}: an origin must contain '*' or start with {', '.join(_ORIGIN_SCHEMES)}"
            )
    return listed


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"must be at least 1, got {number}")
    return number


def choice(*choices: str) -> Callable[[str], str]:
    """A parser that takes one of `choices`, in any case."""

    def parse(value: str) -> str:
        if value.lower() not in choices:
            raise ValueError(f"must be {', '.join(choices[:-1])} or {choices[-1]}")
        return value.lower()

    return parse


def names(value: str) -> tuple[str, ...]:
    """A comma-separated list; blanks are dropped."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


def priority(value: str) -> Priority:
    try:
        return Priority(value.lower())
    except ValueError:
        raise ValueError(f"must be one of {', '.join(p.value for p in Priority)}") from None


def webhook_endpoints(value: str) -> tuple[tuple[str, str], ...]:
    """Comma-separated webhook endpoints, each `name=URL` or a bare URL (then named by the URL itself)."""
    endpoints: list[tuple[str, str]] = []
    for entry in names(value):
        name, _, url = entry.partition("=") if "=" in entry.split("://", 1)[0] else ("", "", entry)
        url = url.strip()
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{entry!r}: a webhook endpoint is an http(s) URL, or name=URL")
        name = name.strip() or url
        if name in (n for n, _ in endpoints):
            raise ValueError(f"{name!r} is named twice")
        endpoints.append((name, url))
    return tuple(endpoints)


def parse_webhook_secret(value: str) -> str | None:
    """A Standard Webhooks secret as OpenAI issues them: `whsec_` and a base64 key; empty: none."""
    value = value.strip()
    if not value:
        return None
    if not value.startswith("whsec_"):
        raise ValueError("must start with whsec_ followed by a base64 key")
    try:
        key = base64.b64decode(value.removeprefix("whsec_"), validate=True)
    except ValueError:
        raise ValueError("the part after whsec_ is not valid base64") from None
    if len(key) < 16:
        raise ValueError("the key is too short: use at least 16 random bytes (24 or 32 are usual)")
    return value


def optional(value: str) -> str | None:
    """Text, where empty means unset."""
    return value or None


def path(value: str) -> Path:
    return Path(value).expanduser()


def optional_path(value: str) -> Path | None:
    """A file's path, where empty means none."""
    return path(value) if value else None


POSTGRES_SCHEMES = ("postgresql", "postgres")


def parse_db(value: str) -> Path | str:
    """FOREMAN_DB: a file path (SQLite) or a `postgresql://` URL, kept as given for libpq.

    Anything else with a `scheme://` is refused rather than taken for a path
    (it would make a folder named `mysql:` and a queue nobody else shares).
    """
    text = value.strip()
    scheme, sep, _ = text.partition("://")
    if sep and scheme.isascii() and scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
        if scheme.lower() in POSTGRES_SCHEMES:
            return text
        raise ValueError(
            f"{scheme}:// is not a database foreman can use: give a file path (SQLite) or a postgresql:// URL"
        )
    return Path(text).expanduser()


def redact_url(url: str) -> str:
    """`url` without its password, for logs and /status."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


_BYTE_UNITS = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_bytes(value: str) -> int:
    """A size in bytes from `1048576`, `512M`, `512MiB`, `2G` or `0`."""
    text = value.strip().lower().removesuffix("ib").removesuffix("b")
    scale = _BYTE_UNITS.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in _BYTE_UNITS else text
    try:
        size = float(number) * scale
    except ValueError as exc:
        raise ValueError(f"not a size: {value!r} (use bytes, or a number with K, M or G)") from exc
    if size < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return int(size)


def default_db_path(environ: Mapping[str, str]) -> Path:
    """systemd's StateDirectory when it set one, else the XDG state directory."""
    state_directory = environ.get("STATE_DIRECTORY")
    if state_directory:
        return Path(state_directory.split(":")[0]) / "foreman.db"
    xdg = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "foreman" / "foreman.db"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
