"""Flags, FOREMAN_* variables and their defaults become one Config."""

from __future__ import annotations

from pathlib import Path

import pytest

from foreman.cli import build_parser, config_from, main, serve_settings
from foreman.config import Config, client_url, default_db_path, parse_keep_alive, parse_listen, parse_upstream


def config_for(argv: list[str], environ: dict[str, str]):
    parser, settings = build_parser(environ, isatty=False)
    args = parser.parse_args(["serve", *argv])
    from foreman.cli import _parse_settings

    return config_from(_parse_settings(parser, args, settings))


def test_defaults_match_the_documented_ones(tmp_path: Path) -> None:
    """With nothing set, foreman listens on 11435 in front of Ollama on 11434."""
    config = config_for([], {"XDG_STATE_HOME": str(tmp_path)})
    assert (config.host, config.port) == ("127.0.0.1", 11435)
    assert config.upstream == "http://127.0.0.1:11434"
    assert config.db_path == tmp_path / "foreman" / "foreman.db"
    assert config.log_format == "json"  # not a terminal
    assert config.max_attempts == 8 and config.pin_keep_alive == -1 and config.release_keep_alive == "5m"
    assert (config.max_wait, config.min_residency, config.parallel) == (600, 0, 1)
    assert config.sync_priority == "interactive" and config.warm == "auto"


def test_the_command_line_and_config_agree_on_every_default(tmp_path: Path) -> None:
    """The flags' defaults and Config's own (which tests and the demo use) cannot drift apart."""
    config = config_for([], {"XDG_STATE_HOME": str(tmp_path)})
    assert config == Config(db_path=config.db_path, log_format=config.log_format)


def test_scheduling_settings_come_from_flags_and_variables() -> None:
    """FOREMAN_MAX_WAIT, _MIN_RESIDENCY, _PARALLEL, _SYNC_PRIORITY and _WARM reach the Config."""
    environ = {
        "FOREMAN_MAX_WAIT": "120",
        "FOREMAN_MIN_RESIDENCY": "30",
        "FOREMAN_SYNC_PRIORITY": "batch",
        "FOREMAN_WARM": "off",
    }
    config = config_for(["--parallel", "4"], environ)
    assert (config.max_wait, config.min_residency, config.parallel) == (120, 30, 4)
    assert config.sync_priority == "batch" and config.warm == "off"
    with pytest.raises(SystemExit):
        config_for([], {"FOREMAN_SYNC_PRIORITY": "urgent"})


def test_environment_sets_and_flags_override() -> None:
    """FOREMAN_* variables set values; a flag beats its variable."""
    environ = {
        "FOREMAN_HOST": "0.0.0.0:9000",
        "FOREMAN_UPSTREAM": "gpu-box:11434",
        "FOREMAN_MAX_ATTEMPTS": "3",
        "FOREMAN_PIN_KEEP_ALIVE": "24h",
        "FOREMAN_LOG_FORMAT": "console",
        "FOREMAN_DB": "/tmp/q.db",
    }
    config = config_for(["--max-attempts", "5"], environ)
    assert (config.host, config.port) == ("0.0.0.0", 9000)
    assert config.upstream == "http://gpu-box:11434"
    assert config.max_attempts == 5
    assert config.pin_keep_alive == "24h" and config.log_format == "console"
    assert config.db_path == Path("/tmp/q.db")


def test_foreman_db_takes_a_path_or_a_postgresql_url(tmp_path: Path) -> None:
    """A path is a SQLite file, as before; a postgresql:// URL is kept whole for libpq."""
    config = config_for([], {"FOREMAN_DB": "~/q.db"})
    assert (config.db_path, config.db_url) == (Path.home() / "q.db", None)
    for url in ("postgresql://foreman@db.lab:5432/foreman", "postgres://db.lab/foreman?sslmode=require"):
        config = config_for(["--db", url], {"XDG_STATE_HOME": str(tmp_path)})
        assert config.db_url == url
        assert not (tmp_path / "foreman").exists() and not Path("postgresql:").exists()


def test_node_settings_come_from_flags_and_variables() -> None:
    """FOREMAN_NODE names the node (none: hostname:port at start); FOREMAN_NODE_TIMEOUT is a duration."""
    assert (config_for([], {}).node, config_for([], {}).node_timeout) == (None, 15)
    config = config_for(["--node-timeout", "1m"], {"FOREMAN_NODE": "gpu-2"})
    assert (config.node, config.node_timeout) == ("gpu-2", 60)


@pytest.mark.parametrize("url", ["mysql://db/foreman", "sqlite:///var/q.db", "redis://localhost:6379"])
def test_another_database_url_is_refused_in_one_line(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """FOREMAN_DB with any other scheme stops start-up, instead of becoming a folder named after it."""
    with pytest.raises(SystemExit) as exited:
        config_for([], {"FOREMAN_DB": url})
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    scheme = url.split(":")[0]
    assert f"FOREMAN_DB={url!r}: {scheme}:// is not a database foreman can use" in error
    assert "postgresql:// URL" in error


def test_bad_values_name_the_setting(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad variable stops start-up with a message that names it."""
    with pytest.raises(SystemExit) as exited:
        config_for([], {"FOREMAN_PIN_KEEP_ALIVE": "forever"})
    assert exited.value.code == 2
    assert "FOREMAN_PIN_KEEP_ALIVE" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:11435", ("127.0.0.1", 11435)),
        ("localhost", ("localhost", 11435)),
        (":8080", ("0.0.0.0", 8080)),
        ("http://0.0.0.0:11500", ("0.0.0.0", 11500)),
        ("[::1]:11435", ("::1", 11435)),
        ('"127.0.0.1:1"', ("127.0.0.1", 1)),
    ],
)
def test_listen_address_takes_ollama_host_forms(value: str, expected: tuple[str, int]) -> None:
    """FOREMAN_HOST reads like OLLAMA_HOST."""
    assert parse_listen(value) == expected


def test_https_listen_is_refused() -> None:
    """foreman serves plain HTTP and says so."""
    with pytest.raises(ValueError, match="plain http"):
        parse_listen("https://0.0.0.0:443")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://127.0.0.1:11434/", "http://127.0.0.1:11434"),
        ("127.0.0.1", "http://127.0.0.1:11434"),
        ("0.0.0.0:11434", "http://127.0.0.1:11434"),
        ("https://ollama.example", "https://ollama.example"),
    ],
)
def test_upstream_takes_urls_and_ollama_host_forms(value: str, expected: str) -> None:
    """FOREMAN_UPSTREAM may be a URL or an OLLAMA_HOST-style address."""
    assert parse_upstream(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:11435", "http://127.0.0.1:11435"),
        (":9000", "http://127.0.0.1:9000"),
        ("0.0.0.0:9000", "http://127.0.0.1:9000"),
        ("gpu-box", "http://gpu-box:11435"),
        ("http://gpu-box:9000", "http://gpu-box:9000"),
        ("[::1]:9000", "http://[::1]:9000"),
    ],
)
def test_client_url_reads_foreman_host_as_the_daemon_does(value: str, expected: str) -> None:
    """A client finds the daemon where FOREMAN_HOST makes it listen; a wildcard host means this machine."""
    assert client_url(value) == expected


def test_db_path_follows_systemd_then_xdg(tmp_path: Path) -> None:
    """systemd's STATE_DIRECTORY wins over XDG_STATE_HOME, which wins over ~/.local/state."""
    assert default_db_path({"STATE_DIRECTORY": "/var/lib/foreman:/other"}) == Path(
        "/var/lib/foreman/foreman.db"
    )
    assert default_db_path({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "foreman" / "foreman.db"
    assert default_db_path({}) == Path.home() / ".local" / "state" / "foreman" / "foreman.db"


def test_keep_alive_settings_parse_to_what_ollama_takes() -> None:
    """`-1` is sent as a number (a string "-1" would be a 400 in Ollama)."""
    assert parse_keep_alive("-1") == -1
    assert parse_keep_alive("300") == 300
    assert parse_keep_alive("30m") == "30m"
    with pytest.raises(ValueError):
        parse_keep_alive("soon")


def test_every_setting_has_a_foreman_variable() -> None:
    """Each serve flag is documented with its FOREMAN_* variable."""
    for setting in serve_settings({}, isatty=True):
        assert setting.env == "FOREMAN_" + setting.flag.removeprefix("--").replace("-", "_").upper()


def test_serve_reports_a_port_in_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A busy port is one clear log line and exit code 1, not a traceback."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(
            ["serve", "--host", f"127.0.0.1:{port}", "--db", str(tmp_path / "q.db"), "--log-format", "json"],
            environ={},
        )
    assert code == 1
    out = capsys.readouterr().out
    assert "foreman.listen_failed" in out and "Traceback" not in out
