"""The client commands start light: they load an HTTP client, not the daemon."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What only `foreman serve` needs: the queue, the worker and the policy, the web
# server and what they pull in. A client command that loads them starts slower
# for nothing (SQLite, the scheduler, prometheus and structlog on every `foreman status`).
DAEMON_ONLY = (
    "foreman.app",
    "foreman.api.inference",
    "foreman.api.job_api",
    "foreman.dialects.intake",
    "foreman.scheduling.policy",
    "foreman.storage",
    "foreman.storage.sqlite",
    "foreman.ollama.client",
    "foreman.worker.loop",
    "sqlite3",
    "aiohttp.web",
    "prometheus_client",
    "structlog",
    "tenacity",
    "ulid",
)

PROBE = """
import json, sys
from foreman.cli import main
host = sys.argv.pop()
main(sys.argv[1:], environ={"FOREMAN_HOST": host})
print(json.dumps(sorted(sys.modules)))
"""


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    "command", [["status"], ["jobs", "--state", "done"], ["job", "01J0"], ["cancel", "01J0"]]
)
def test_client_commands_do_not_import_the_daemon(command: list[str]) -> None:
    """`foreman status` and its siblings load neither SQLite, the worker, the store nor the scheduler."""
    ran = subprocess.run(
        [sys.executable, "-c", PROBE, *command, f"127.0.0.1:{closed_port()}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "cannot reach the daemon" in ran.stderr  # it got as far as talking to one
    loaded = set(json.loads(ran.stdout.splitlines()[-1]))
    assert sorted(loaded.intersection(DAEMON_ONLY)) == []
