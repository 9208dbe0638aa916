"""`foreman batch`: submit a JSONL file as a batch, follow it, list, show, cancel and fetch its results."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from foreman.cli import build_parser
from foreman.client.commands import run_command
from stub_ollama import StubServer
from tests.clients.test_cli_commands import Ran, Terminal, ctl
from tests.clients.test_openai_batches import chat_line, jsonl
from tests.support.helpers import Foreman, MakeForeman, reply_text


def batch_file(tmp_path: Path, count: int = 3, model: str = "llama3") -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(jsonl([chat_line(f"p{i}", model, f"q{i}") for i in range(count)]))
    return path


async def batch(host: str, *argv: str, err: io.StringIO | None = None) -> Ran:
    return await ctl(host, "batch", *argv)


async def test_submit_wait_in_a_pipe_then_results(foreman: Foreman, tmp_path: Path) -> None:
    """Piped, --wait writes plain progress lines and the end; results -o writes OpenAI's output lines."""
    ran = await batch(foreman.url, "submit", str(batch_file(tmp_path)), "--wait", "--interval", "0.01")
    assert ran.code == 0, ran.err
    batch_id = ran.out.strip()
    assert batch_id.startswith("batch_")
    assert "\r" not in ran.err and "\x1b" not in ran.err
    assert re.search(r"^3/3 finished: 3 done  ", ran.err, re.M), ran.err
    assert ran.err.splitlines()[-1].startswith(f"{batch_id} completed: 3 done, 0 failed of 3")
    out = tmp_path / "out.jsonl"
    ran = await batch(foreman.url, "results", batch_id, "-o", str(out))
    assert ran.code == 0, ran.err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == ["p0", "p1", "p2"]
    assert lines[2]["response"]["body"]["choices"][0]["message"]["content"] == reply_text("llama3", "q2")
    listed = await batch(foreman.url, "list")
    assert listed.out.splitlines()[0].split() == [
        "ID",
        "STATUS",
        "ENDPOINT",
        "DONE",
        "FAILED",
        "TOTAL",
        "CREATED",
    ]
    assert listed.out.splitlines()[1].split()[:6] == [
        batch_id,
        "completed",
        "/v1/chat/completions",
        "3",
        "0",
        "3",
    ]
    as_json = await batch(foreman.url, "submit", str(batch_file(tmp_path)), "--json")
    assert json.loads(as_json.out)["status"] == "validating"
    shown = await batch(foreman.url, "show", batch_id)
    assert "requests   3 done, 0 failed of 3" in shown.out and "output     file-" in shown.out


async def test_submit_wait_on_a_terminal_draws_one_bar(foreman: Foreman, tmp_path: Path) -> None:
    """On a terminal, --wait redraws one bar in place with done, failed, total, rate and time left."""
    args = build_parser({}, isatty=False).parse_args(
        [
            "batch",
            "submit",
            str(batch_file(tmp_path, 4)),
            "--wait",
            "--interval",
            "0.01",
            "--host",
            foreman.url,
        ]
    )
    err = Terminal()
    assert await run_command(args, io.StringIO(), err) == 0
    bar_part = err.getvalue().rsplit("\n", 2)[0]  # the last line is the end's summary
    frames = bar_part.split("\r")[1:]
    assert frames and "\n" not in "".join(frames)
    assert re.fullmatch(r"\[#{30}\] 4 done of 4  [0-9.]+/s  0\.0s left\x1b\[K", frames[-1]), frames[-1]


async def test_cancel_and_results_of_a_running_batch(
    make_foreman: MakeForeman, stub_server: StubServer, tmp_path: Path
) -> None:
    """cancel says `cancelling`; results before the end says why there are none, and exits 1."""
    foreman = await make_foreman(stub_server.url)
    stub_server.stub.faults.hang_next(1)
    ran = await batch(foreman.url, "submit", str(batch_file(tmp_path, 3)))
    batch_id = ran.out.strip()
    await stub_server.stub.wait_for(lambda s: s.faults.hung == 1)
    early = await batch(foreman.url, "results", batch_id)
    assert early.code == 1 and "its results come when it ends" in early.err
    cancelled = await batch(foreman.url, "cancel", batch_id)
    assert cancelled.out == f"{batch_id} cancelling\n"
    stub_server.stub.faults.release_hung()
    unknown = await batch(foreman.url, "show", "batch_nope")
    assert (unknown.code, unknown.err) == (1, "foreman batch: No such batch: batch_nope\n")
    args = build_parser({}, isatty=False).parse_args(
        ["batch", "submit", "--host", foreman.url, str(tmp_path / "missing.jsonl")]
    )
    err = io.StringIO()
    assert await run_command(args, io.StringIO(), err) == 1
    assert err.getvalue().startswith("foreman batch: cannot read")
