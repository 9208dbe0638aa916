"""foreman's settings: one table, from which the flags, the FOREMAN_* variables, Config and the README come.

Each setting is one field of `Config`, declared with `setting()`: its default
as a person writes it, the parser that reads that text (and so the type), and
its help. The flag is `--` and the name with dashes, the variable `FOREMAN_`
and the name in capitals, unless the entry names others. `cli.py` builds
`foreman serve`'s flags from `SETTINGS`, and a test holds README's
Configuration table to `markdown_table()`.

Adding a setting is one line in `Config`; every duration takes `duration` (or
`positive_duration`), so it reads `90`, `90s`, `15m`, `12h`, `7d` and `1h30m`.
"""

from __future__ import annotations

import base64
import dataclasses
import difflib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from foreman.durations import duration, is_keep_alive, positive_duration
from foreman.job import Priority

DEFAULT_PORT = 11435
OLLAMA_PORT = 11434

# sysexits' EX_CONFIG: systemd's RestartPreventExitStatus stops retrying a
# start that cannot succeed until a person looks.
EXIT_CONFIG = 78


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


# ---- the table


@dataclass(frozen=True, slots=True)
class Setting:
    """One row of the table: a field of Config, with its flag, variable, default and help."""

    name: str  # the Config field
    parse: Callable[[str], Any]  # the text of the flag or variable → the field's value
    default: str  # as a person writes it; Config's default is parse(default)
    help: str
    flag: str
    env: str
    # Where the default depends on the machine: from the environment and
    # whether stdout is a terminal. `default` then says in words what it is.
    default_from: Callable[[Mapping[str, str], bool], str] | None = None

    def default_text(self, environ: Mapping[str, str], isatty: bool) -> str:
        """The default on this machine, as a flag would give it."""
        return self.default_from(environ, isatty) if self.default_from else self.default


_FROM_TEXT: Any = object()


def setting(
    default: str,
    parse: Callable[[str], Any],
    help: str,
    *,
    flag: str | None = None,
    default_from: Callable[[Mapping[str, str], bool], str] | None = None,
    value: Any = _FROM_TEXT,
    required: bool = False,
) -> Any:
    """Declare a Config field as a setting (see the module docstring).

    `value` is Config's own default where `default` describes one in words;
    `required` leaves Config without one.
    """
    entry = {"default": default, "parse": parse, "help": help, "flag": flag, "default_from": default_from}
    metadata = {"setting": entry}
    if required:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=parse(default) if value is _FROM_TEXT else value, metadata=metadata)


@dataclass(frozen=True, slots=True)
class Config:
    """What `foreman serve` runs with: one field per setting, in the order README lists them."""

    # Required, so that a test or an embedding never writes to the user's own queue by accident.
    # A path is a SQLite file; a postgresql:// URL (a str) is a queue shared with every node given it.
    db_path: Path | str = setting(
        "`$STATE_DIRECTORY/foreman.db` under systemd, else `$XDG_STATE_HOME/foreman/foreman.db`"
        " (`~/.local/state/foreman/foreman.db`)",
        parse_db,
        "the queue: a SQLite file, or a `postgresql://` URL shared by several nodes"
        " (see [Several hosts](several-hosts.md)); any other `scheme://` is refused",
        flag="--db",
        default_from=lambda environ, _: str(default_db_path(environ)),
        required=True,
    )
    node: str | None = setting(
        "",
        optional,
        "this node's name among the nodes sharing a PostgreSQL queue (empty: `hostname:port`)",
    )
    node_timeout: float = setting(
        "15s",
        positive_duration,
        "how long a node may go without a heartbeat before it counts as dead and its running jobs go"
        " back in line (PostgreSQL)",
    )
    listen: Address = setting(
        f"127.0.0.1:{DEFAULT_PORT}",
        parse_listen,
        "listen address, in `OLLAMA_HOST`'s forms (`host:port`, `host`, `:port`, `http://host:port`);"
        " the client commands look for the daemon there",
        flag="--host",
    )
    upstream: str = setting(
        f"http://127.0.0.1:{OLLAMA_PORT}", parse_upstream, "Ollama's base URL (or `host:port`)"
    )
    log_format: str = setting(
        "`console` on a terminal, `json` otherwise",
        choice("console", "json"),
        "log rendering: `console` or `json`",
        default_from=lambda _, isatty: "console" if isatty else "json",
        value="console",
    )
    log_level: str = setting(
        "info", choice("debug", "info", "warning", "error"), "`debug`, `info`, `warning` or `error`"
    )
    max_attempts: int = setting("8", positive_int, "tries per job on transient failures")
    backoff_initial: float = setting("0.5s", duration, "the first backoff step; each step doubles")
    backoff_max: float = setting("30s", duration, "the longest backoff step")
    stall_timeout: float = setting(
        "5m",
        duration,
        "how long Ollama may send nothing (before a reply's first byte or between two chunks) before foreman"
        " gives the request up and retries the job; a swap's load gets its learned load time on top;"
        " `0` waits for ever (see [Reliability](reliability.md#a-wedged-ollama))",
    )
    ollama_restart: str | None = setting(
        "",
        optional,
        "a shell command that restarts Ollama (such as `systemctl restart ollama`), run after"
        " `FOREMAN_RESTART_AFTER_STALLS` stalls in a row, once per incident, then with backoff",
    )
    restart_after_stalls: int = setting(
        "3", positive_int, "stalls in a row after which foreman runs `FOREMAN_OLLAMA_RESTART`"
    )
    # keep_alive values as sent to Ollama: a number of seconds or a duration string.
    pin_keep_alive: float | str = setting(
        "-1",
        parse_keep_alive,
        "`keep_alive` that pins the loaded model while work waits (seconds or a duration like `24h`)",
    )
    # None: a released model gets Ollama's own default (OLLAMA_KEEP_ALIVE), which
    # foreman reads off the first model it loads; a value overrides it.
    release_keep_alive: float | str | None = setting(
        "",
        optional_keep_alive,
        "`keep_alive` a model foreman loaded or pinned ends with when the client gave none; unset, it is"
        " Ollama's own default, which foreman reads off the first model it loads (see [Pinning](how-it-works.md#the-worker))",
    )
    max_body: int = setting(str(32 * 1024 * 1024), positive_int, "largest queued request body, in bytes")
    # Node's fetch gives up on headers after 300 s; an early 200 keeps such clients waiting.
    early_headers: float = setting(
        "1m",
        duration,
        "how long a streaming client waits in the queue before foreman sends 200 and its headers",
    )
    retention: float = setting("7d", positive_duration, "how long finished jobs and their output are kept")
    max_wait: float = setting(
        "10m",
        duration,
        "how long a job may wait before its model is served next, even at the cost of a swap (see [Scheduling](scheduling.md))",
    )
    min_residency: float = setting(
        "0s",
        duration,
        "how long a freshly loaded model keeps the worker before the wait bound may swap it away",
    )
    parallel: int = setting(
        "1",
        positive_int,
        "jobs in flight at once, all for the one loaded model; set it to Ollama's `OLLAMA_NUM_PARALLEL`",
    )
    cloud_parallel: int = setting(
        "4",
        positive_int,
        "jobs for cloud models (`:cloud`, `-cloud`) in flight at once, beside the worker; they load nothing here",
    )
    sync_priority: Priority = setting(
        "interactive",
        priority,
        "class of a request that sends no `X-Foreman-Priority` header: `interactive` or `batch`",
    )
    async_priority: Priority = setting(
        "batch",
        priority,
        "class of an async submission (`Prefer: respond-async`) that sends no `X-Foreman-Priority` header",
    )
    warm: str = setting(
        "auto",
        choice("auto", "off"),
        "`auto`: read the next model's blob into the page cache while the loaded one drains,"
        " where foreman can read it; `off`: never",
    )
    sync: str = setting(
        "normal",
        choice("normal", "full"),
        "`normal` survives a crash of foreman; `full` also survives power loss: a job's record is fsynced"
        " before its answer (see [Reliability](reliability.md))",
    )
    loop: str = setting(
        "uvloop",
        choice("uvloop", "asyncio"),
        "the event loop: `uvloop` (libuv's, faster; see [Performance](performance.md)) or `asyncio`"
        " (the standard library's)",
    )
    max_queue: int = setting(
        "100000",
        positive_int,
        'most jobs that may wait at once; beyond it a request gets 503 with Ollama\'s "server busy" wording'
        " and `Retry-After`",
    )
    shutdown_grace: float = setting(
        "30s", duration, "how long running jobs get to finish on SIGTERM before they go back to the queue"
    )
    token: str | None = setting(
        "",
        optional,
        "when set, every endpoint but `/healthz` and the live page's files needs `Authorization: Bearer <token>`; the client commands send it",
    )
    allowed_hosts: tuple[str, ...] = setting(
        "",
        names,
        "comma-separated `Host` names accepted beside those Ollama accepts (see [Who gets in](reliability.md#who-gets-in))",
    )
    origins: tuple[str, ...] = setting(
        "",
        origin_list,
        "comma-separated browser origins allowed beside Ollama's defaults and `OLLAMA_ORIGINS`,"
        " one `*` each, like `OLLAMA_ORIGINS`",
    )
    read_timeout: float = setting(
        "1m", duration, "how long a client may take to send its request body (then 408)"
    )
    routes: Path | None = setting(
        "",
        optional_path,
        "TOML file of model aliases and intent routes; SIGHUP reloads it (see [Model routing](routing.md))",
    )
    # Embeddings (docs/embeddings.md).
    embed_batch: int = setting(
        "64",
        positive_int,
        "most inputs one coalesced `/api/embed` call carries; `1` turns coalescing off (see [Embeddings](embeddings.md))",
    )
    embed_cache: int = setting(
        "512M",
        parse_bytes,
        "bytes of embeddings cached in the database, least recently used out (`K`, `M`, `G`); `0` turns the cache off",
    )
    cache_refresh: float = setting(
        "60s",
        positive_duration,
        "how often Ollama's model list is read for digests changed behind foreman (`90s`, `15m`)",
    )

    # Batches and webhooks (docs/batches.md).
    file_max: int = setting(
        "200M",
        parse_bytes,
        "largest file `POST /v1/files` takes (`K`, `M`, `G`); OpenAI's limit for a batch input file"
        " (see [Batches](batches.md))",
    )
    webhook_url: tuple[tuple[str, str], ...] = setting(
        "",
        webhook_endpoints,
        "comma-separated webhook endpoints, each a URL or `name=URL`, sent signed events when a batch"
        " ends and, for async jobs that name one, when the job ends (see [Webhooks](batches.md#webhooks))",
    )
    webhook_secret: str | None = setting(
        "",
        parse_webhook_secret,
        "the Standard Webhooks key events are signed with: `whsec_` and base64, as OpenAI issues them;"
        " needed with `FOREMAN_WEBHOOK_URL`",
    )
    webhook_backoff: float = setting(
        "5s",
        duration,
        "the wait before a webhook delivery's first retry; it doubles up to an hour, and a delivery is"
        " given up a day after its event",
    )

    def __post_init__(self) -> None:
        if self.webhook_url and self.webhook_secret is None:
            raise ValueError(
                "FOREMAN_WEBHOOK_URL needs FOREMAN_WEBHOOK_SECRET (whsec_ and a base64 key) to sign events"
            )

    @property
    def db_url(self) -> str | None:
        """The PostgreSQL URL of a shared queue; None for a SQLite file."""
        return self.db_path if isinstance(self.db_path, str) else None

    @property
    def db_file(self) -> Path:
        """The SQLite file (only when `db_url` is None)."""
        assert isinstance(self.db_path, Path), "a PostgreSQL queue has no file"
        return self.db_path

    @property
    def host(self) -> str:
        return self.listen.host

    @property
    def port(self) -> int:
        return self.listen.port


def _table() -> tuple[Setting, ...]:
    rows = []
    for field in dataclasses.fields(Config):
        entry = field.metadata["setting"]
        flag = entry["flag"] or "--" + field.name.replace("_", "-")
        rows.append(
            Setting(
                name=field.name,
                parse=entry["parse"],
                default=entry["default"],
                help=entry["help"],
                flag=flag,
                env="FOREMAN_" + flag.removeprefix("--").replace("-", "_").upper(),
                default_from=entry["default_from"],
            )
        )
    return tuple(rows)


SETTINGS = _table()


def config_from(raw: Mapping[str, str]) -> Config:
    """Config from the text of each setting, by field name; raises ValueError naming the setting."""
    values = {}
    for entry in SETTINGS:
        text = raw[entry.name]
        try:
            values[entry.name] = entry.parse(text)
        except ValueError as exc:
            raise ValueError(f"{entry.flag} / {entry.env}={text!r}: {exc}") from None
    return Config(**values)


_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")


def plain(text: str) -> str:
    """A setting's help as a terminal shows it: `see [Several hosts](#several-hosts)` → `see Several hosts`."""
    return _LINK.sub(r"\1", text).replace("`", "")


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """Each FOREMAN_* variable that is no setting, with the setting's variable it most looks like.

    A misspelt variable is otherwise silently ignored: FOREMAN_MAX_WIAT=3s
    would leave the wait bound at its default with nothing to say so.
    """
    known = [entry.env for entry in SETTINGS]
    # Compared without the prefix they share, which would make every name look alike.
    suffixes = [name.removeprefix("FOREMAN_") for name in known]

    def nearest(name: str) -> str | None:
        close = difflib.get_close_matches(name.removeprefix("FOREMAN_"), suffixes, n=1, cutoff=0.6)
        return "FOREMAN_" + close[0] if close else None

    return [
        (name, nearest(name)) for name in sorted(environ) if name.startswith("FOREMAN_") and name not in known
    ]


def markdown_table(docs: str = "docs/") -> str:
    """The Configuration table, for README (`docs/`) or a page of the docs site beside the others (`""`).

    The help links to the docs' pages by their file names; `docs` is the path from the table's
    page to them.
    """
    lines = ["| flag / variable | default | meaning |", "|---|---|---|"]
    for entry in SETTINGS:
        shown = f"`{entry.default}`" if entry.default else "none"
        if entry.default_from:  # a default in words
            shown = entry.default
        meaning = _LINK_TARGET.sub(lambda m: f"]({docs}{m.group(1)})", entry.help)
        lines.append(f"| `{entry.flag}` / `{entry.env}` | {shown} | {meaning} |")
    return "\n".join(lines)


_LINK_TARGET = re.compile(r"\]\(([\w-]+\.md(?:#[\w-]+)?)\)")


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
