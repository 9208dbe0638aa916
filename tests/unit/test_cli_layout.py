"""How the client commands lay out the API's JSON: pure functions, no daemon."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import pytest
from ulid import ULID

from foreman.client import layout

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC).timestamp()


def ulid_at(seconds_ago: float) -> str:
    return str(ULID.from_timestamp(NOW - seconds_ago))


def iso_at(seconds_ago: float) -> str:
    return (
        datetime.fromtimestamp(NOW - seconds_ago, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def job_view(**overrides: Any) -> dict[str, Any]:
    view = {
        "id": "01JQ0000000000000000000001",
        "state": "done",
        "endpoint": "/api/chat",
        "model": "llama3",
        "model_key": "llama3:latest",
        "async": True,
        "attempt": 0,
        "position": None,
        "created_at": iso_at(90),
        "started_at": iso_at(60),
        "finished_at": iso_at(58),
        "queue_wait_s": 30.0,
        "run_s": 2.0,
        "status": 200,
        "error": None,
        "result": {"model": "llama3", "message": {"role": "assistant", "content": "Hello there"}},
    }
    return {**view, **overrides}


def test_table_pads_columns_and_aligns_numbers_right() -> None:
    """Every column is as wide as its widest cell; numeric columns line up on the right."""
    lines = layout.table(["MODEL", "WAITING"], [["llama3:latest", "3"], ["qwen2", "12"]], right={1})
    assert lines == [
        "MODEL          WAITING",
        "llama3:latest        3",
        "qwen2               12",
    ]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (0.04, "0.0s"),
        (4.25, "4.2s"),
        (42.9, "42s"),
        (185, "3m05s"),
        (7800, "2h10m"),
        (3 * 86400 + 4 * 3600, "3d04h"),
        (-1, "0.0s"),
    ],
)
def test_durations_read_at_a_glance(seconds: float | None, text: str) -> None:
    """Durations use the largest fitting unit and never go negative."""
    assert layout.duration(seconds) == text


def test_sizes_use_decimal_units() -> None:
    """Database sizes read as B, kB, MB."""
    assert [layout.size(n) for n in (812, 61_800, 1_250_000)] == ["812 B", "61.8 kB", "1.2 MB"]


STATUS: dict[str, Any] = {
    "version": "0.1.0",
    "upstream": {"url": "http://127.0.0.1:11434", "reachable": True, "loaded": ["llama3:latest"]},
    "resident": ["llama3:latest"],
    "running": job_view(state="working", finished_at=None, run_s=4.2, status=None, result=None),
    "queue": [
        {"model": "llama3:latest", "waiting": 1, "oldest_job": ulid_at(12), "oldest_at": iso_at(12)},
        {"model": "qwen2:latest", "waiting": 1, "oldest_job": ulid_at(30), "oldest_at": iso_at(30)},
        {"model": "mistral:latest", "waiting": 2, "oldest_job": ulid_at(31), "oldest_at": iso_at(31)},
    ],
    "jobs": {"done": 12, "queued": 4, "working": 1, "failed": 1},
    "swaps": 3,
    "last_error": {"message": "upstream unreachable:\n connection refused", "at": iso_at(125), "age_s": 125},
    "db": {"path": "/var/lib/foreman/foreman.db", "size_bytes": 1_250_000},
}


def test_status_shows_the_daemon_then_the_queue_in_drain_order() -> None:
    """The whole `foreman status` layout, as the README shows it."""
    assert layout.format_status(STATUS, NOW) == "\n".join(
        [
            "foreman     0.1.0, database /var/lib/foreman/foreman.db (1.2 MB)",
            "ollama      http://127.0.0.1:11434 (reachable)",
            "resident    llama3:latest",
            "running     01JQ0000000000000000000001  llama3 /api/chat  working for 4.2s",
            "jobs        4 queued, 1 working, 12 done, 1 failed",
            "swaps       3",
            "last error  2m05s ago: upstream unreachable: connection refused",
            "",
            "QUEUE (drain order)  WAITING  OLDEST",
            "llama3:latest              1     12s  #",
            "qwen2:latest               1     30s  #",
            "mistral:latest             2     31s  ##",
        ]
    )


def test_status_of_an_idle_daemon_with_ollama_down() -> None:
    """Nothing running, nothing queued, and an unreachable Ollama said plainly."""
    idle = {
        **STATUS,
        "upstream": {"url": "http://127.0.0.1:11434", "reachable": False, "loaded": []},
        "resident": [],
        "running": None,
        "queue": [],
        "jobs": {},
        "last_error": None,
    }
    text = layout.format_status(idle, NOW)
    assert "ollama      http://127.0.0.1:11434 (NOT REACHABLE)" in text
    assert "resident    none\nrunning     nothing\njobs        none" in text
    assert text.endswith("last error  none\n\nqueue is empty")


def test_status_of_a_node_on_a_shared_queue_lists_every_node() -> None:
    """With PostgreSQL: the URL and this node's name, then a table of the nodes, a dead one marked."""
    node = {"upstream": "http://gpu-1:11434", "reachable": True, "serving": "llama3:latest"}
    shared = {
        **STATUS,
        "db": {
            "backend": "postgresql",
            "url": "postgresql://foreman@db/foreman",
            "node": "gpu-1",
            "size_bytes": 8e6,
        },
        "nodes": [
            {**node, "name": "gpu-1", "resident": ["llama3:latest"], "running": ["01JQ1"], "alive": True}
            | {"heartbeat_age_s": 1.2},
            {**node, "name": "gpu-2", "upstream": "http://gpu-2:11434", "reachable": False, "resident": []}
            | {"running": [], "alive": False, "heartbeat_age_s": 42.0},
        ],
    }
    text = layout.format_status(shared, NOW)
    assert text.startswith("foreman     0.1.0, database postgresql://foreman@db/foreman, node gpu-1 (8.0 MB)")
    assert text.endswith(
        "\n".join(
            [
                "",
                "NODE          OLLAMA                     HOLDS          RUNNING  HEARTBEAT",
                "gpu-1         http://gpu-1:11434         llama3:latest  01JQ1    1.2s ago",
                "gpu-2 (gone)  http://gpu-2:11434 (down)  none           nothing  42s ago",
            ]
        )
    )


def test_queue_bars_are_scaled_to_the_longest_queue() -> None:
    """A bar per model, one mark per job until the longest would not fit."""
    queue = [
        {"model": "a", "waiting": 500, "oldest_job": ulid_at(1), "oldest_at": iso_at(1)},
        {"model": "b", "waiting": 5, "oldest_job": ulid_at(1), "oldest_at": iso_at(1)},
    ]
    rows = layout.queue_table(queue, NOW, bar_width=40)
    assert rows[1].endswith("#" * 40) and rows[2].endswith("  #")


def test_jobs_table_adds_an_error_column_only_when_needed() -> None:
    """One row per job with ages and durations; errors get a column, and the cursor a hint."""
    done = job_view()
    failed = job_view(
        id="01JQ0000000000000000000000", state="failed", model="nope", error='model "nope" not found'
    )
    text = layout.format_jobs({"jobs": [done], "next": None}, NOW)
    assert text.splitlines() == [
        "ID                          STATE  MODEL   ENDPOINT     AGE  WAIT   RUN",
        "01JQ0000000000000000000001  done   llama3  /api/chat  1m30s   30s  2.0s",
    ]
    text = layout.format_jobs({"jobs": [done, failed], "next": failed["id"]}, NOW)
    lines = text.splitlines()
    assert lines[0].endswith("ERROR") and lines[2].endswith('model "nope" not found')
    assert lines[-1] == "(more: the same command with --after 01JQ0000000000000000000000)"
    assert layout.format_jobs({"jobs": [], "next": None}, NOW) == "no jobs"


def test_native_and_v1_endpoints_show_in_one_form() -> None:
    """`foreman jobs` shows every endpoint as its path, whether native or /v1."""
    native = job_view()
    v1 = job_view(id="01JQ0000000000000000000002", endpoint="/v1/chat/completions")
    rows = layout.format_jobs({"jobs": [v1, native], "next": None}, NOW).splitlines()[1:]
    assert [row.split()[3] for row in rows] == ["/v1/chat/completions", "/api/chat"]


def test_a_done_job_shows_its_fields_and_its_text() -> None:
    """`foreman job` lists the fields that have values, then the reply's text."""
    text = layout.format_job(job_view(), NOW)
    assert text.splitlines()[:3] == [
        "id          01JQ0000000000000000000001",
        "state       done",
        "model       llama3 (llama3:latest)",
    ]
    assert "created     " + iso_at(90) + " (1m30s ago)" in text
    assert "queue wait  30s\nrun         2.0s\nstatus      200" in text
    assert text.endswith("\n\nHello there")


def test_a_queued_job_shows_its_place_and_a_failed_one_its_error() -> None:
    """Position while queued; the error once failed; no result either way."""
    queued = job_view(state="queued", position=3, started_at=None, finished_at=None, run_s=None, status=None)
    text = layout.format_job({**queued, "result": None}, NOW)
    assert "state       queued, 3 jobs run before it" in text and "started" not in text
    failed = layout.format_job(
        job_view(state="failed", status=404, error="model not found", result=None), NOW
    )
    assert failed.endswith("status      404\nerror       model not found")


@pytest.mark.parametrize(
    ("result", "text"),
    [
        ({"message": {"role": "assistant", "content": "hi"}}, "hi"),
        ({"response": "hello"}, "hello"),
        ({"embeddings": [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]}, "2 embedding(s) of 3 dimensions"),
        ({"embedding": [0.1, 0.2]}, "1 embedding of 2 dimensions"),
        (
            {"message": {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}},
            'tool calls: [{"function": {"name": "f"}}]',
        ),
        (None, None),
    ],
)
def test_result_text_fits_each_endpoint(result: dict[str, Any] | None, text: str | None) -> None:
    """Chat and generate give their text; embeddings give their shape."""
    assert layout.result_text(result) == text


def test_submission_and_outcome_lines() -> None:
    """A submitted job starts with its id; a finished one gets a header and its text or error."""
    accepted = {"id": "01JQ1", "state": "queued", "position": 2}
    assert layout.format_submission(accepted, "batch.jsonl:3") == "01JQ1 queued, position 2 batch.jsonl:3"
    assert layout.format_submission({**accepted, "state": "done", "position": None}, None) == "01JQ1 done"
    assert layout.format_outcome(job_view(), "batch.jsonl:3") == (
        "--- batch.jsonl:3 01JQ0000000000000000000001 llama3 done\nHello there"
    )
    failed = job_view(state="failed", error="model not found", result=None)
    assert (
        layout.format_outcome(failed, None) == "--- 01JQ0000000000000000000001 llama3 failed: model not found"
    )


def test_an_alias_job_shows_the_model_that_served_it() -> None:
    """`foreman jobs` and `foreman job` name the alias asked for and the model picked for it."""
    routed = job_view(model="fast", model_key="@fast(qwen2:1.5b|llama3:8b)", served_model="qwen2:1.5b")
    row = layout.format_jobs({"jobs": [routed], "next": None}, NOW).splitlines()[1]
    assert "fast → qwen2:1.5b" in row
    assert re.search(r"^served by +qwen2:1\.5b$", layout.format_job(routed, NOW), re.M)
    plain = layout.format_job(job_view(served_model=None), NOW)
    assert "served by" not in plain
