"""The client commands against a daemon running in-process: status, jobs, job, cancel, submit, watch."""

from __future__ import annotations

import asyncio
import io
import json
import re
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from foreman.cli import build_parser, main
from foreman.client.commands import run_command
from foreman.client.daemon import Daemon
from stub_ollama import Stub, StubServer
from tests.support.helpers import ASYNC, Foreman, chat_body, hold_worker, reply_text


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str


class Terminal(io.StringIO):
    """A captured stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


async def ctl(
    host: str, command: str, *argv: str, out: io.StringIO | None = None, environ: dict[str, str] | None = None
) -> Ran:
    """Run `foreman COMMAND ... --host HOST` on the test's own loop and capture what it prints."""
    parser = build_parser(environ or {}, isatty=False)
    args = parser.parse_args([command, *argv, "--host", host])
    out = out if out is not None else io.StringIO()
    err = io.StringIO()
    code = await run_command(args, out, err)
    return Ran(code, out.getvalue(), err.getvalue())


def field(text: str, name: str) -> str:
    """The value of a `name  value` line."""
    return next(line[len(name) :].strip() for line in text.splitlines() if line.startswith(name + " "))


async def submit_async(foreman: Foreman, model: str, content: str = "hi") -> str:
    answer = await foreman.client.post("/api/chat", json=chat_body(model, content), headers=ASYNC)
    return str((await answer.json())["id"])


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port with nothing listening: bound, so nobody else takes it, but not accepting."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_status_shows_the_queue_by_model_in_drain_order(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """`foreman status` names the running job and lists what waits for which model, in drain order."""
    first = await hold_worker(http, foreman, stub, "llama3")
    for model in ("qwen2", "mistral", "llama3", "mistral"):
        await submit_async(foreman, model)
    ran = await ctl(foreman.url, "status")
    assert (ran.code, ran.err) == (0, "")
    assert field(ran.out, "ollama") == f"{foreman.config.upstream} (reachable)"
    assert field(ran.out, "resident") == "llama3:latest"
    assert field(ran.out, "running").startswith(f"{foreman.jobs()[0]['id']}  llama3 /api/chat  working for")
    assert field(ran.out, "jobs") == "4 queued, 1 working"
    assert field(ran.out, "swaps") == "1" and field(ran.out, "last error") == "none"
    queue = ran.out.split("QUEUE (drain order)")[1].splitlines()[1:]
    assert [line.split()[:2] for line in queue] == [
        ["llama3:latest", "1"],
        ["qwen2:latest", "1"],
        ["mistral:latest", "2"],
    ]
    stub.faults.release_hung()
    await first


async def test_status_json_is_the_daemons_own(foreman: Foreman) -> None:
    """--json prints /status as the daemon answers it."""
    ran = await ctl(foreman.url, "status", "--json")
    status = json.loads(ran.out)
    assert status["upstream"]["url"] == foreman.config.upstream and status["queue"] == []


async def test_jobs_lists_newest_first_with_filters(foreman: Foreman, stub: Stub) -> None:
    """`foreman jobs` filters by state and model, limits the page and says how to get the next one."""
    for model, content in [("llama3", "a"), ("mistral", "b"), ("llama3", "c"), ("qwen2", "d")]:
        if content == "d":
            stub.faults.fail_next(1, status=404, error="model 'qwen2' not found")
        await foreman.client.post("/api/chat", json=chat_body(model, content))
    ids = [job["id"] for job in foreman.jobs()]
    everything = await ctl(foreman.url, "jobs")
    assert [line.split()[0] for line in everything.out.splitlines()[1:]] == ids[::-1]
    llama = await ctl(foreman.url, "jobs", "--model", "llama3", "--state", "done")
    assert [line.split()[:3] for line in llama.out.splitlines()[1:]] == [
        [ids[2], "done", "llama3"],
        [ids[0], "done", "llama3"],
    ]
    failed = await ctl(foreman.url, "jobs", "--state", "failed")
    assert failed.out.splitlines()[0].endswith("ERROR") and "not found" in failed.out.splitlines()[1]
    page = await ctl(foreman.url, "jobs", "--limit", "1")
    assert page.out.splitlines()[-1] == f"(more: the same command with --after {ids[3]})"
    rest = await ctl(foreman.url, "jobs", "--after", ids[1], "--json")
    assert [job["id"] for job in json.loads(rest.out)["jobs"]] == [ids[0]]
    none = await ctl(foreman.url, "jobs", "--state", "cancelled")
    assert (none.code, none.out) == (0, "no jobs\n")


async def test_job_shows_one_job_and_its_text(foreman: Foreman) -> None:
    """`foreman job ID` shows the job's fields and the reply's text; --json the raw view."""
    await foreman.client.post("/api/chat", json=chat_body("llama3", "hello"))
    job_id = foreman.jobs()[0]["id"]
    ran = await ctl(foreman.url, "job", job_id)
    assert field(ran.out, "state") == "done" and field(ran.out, "model") == "llama3 (llama3:latest)"
    assert ran.out.endswith("\n\n" + reply_text("llama3", "hello") + "\n")
    raw = json.loads((await ctl(foreman.url, "job", job_id, "--json")).out)
    assert raw["result"]["message"]["content"] == reply_text("llama3", "hello")


async def test_unknown_job_is_the_daemons_message_and_exit_1(foreman: Foreman) -> None:
    """A 404 prints the daemon's error on stderr, nothing on stdout, and exits 1."""
    ran = await ctl(foreman.url, "job", "nope")
    assert ran == Ran(1, "", "foreman job: job 'nope' not found\n")


async def test_cancel_a_queued_job_then_409_once_it_ended(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """`foreman cancel` cancels a queued job; cancelling it again is the daemon's 409 message and exit 1."""
    first = await hold_worker(http, foreman, stub, "llama3")
    job_id = await submit_async(foreman, "mistral", "never")
    assert await ctl(foreman.url, "cancel", job_id) == Ran(0, f"{job_id} cancelled\n", "")
    again = await ctl(foreman.url, "cancel", job_id)
    assert again == Ran(1, "", f"foreman cancel: job {job_id} already ended (cancelled)\n")
    stub.faults.release_hung()
    await first
    assert "never" not in [r.prompt for r in stub.inference_requests()]


async def test_cancelled_is_spelt_one_way(http: aiohttp.ClientSession, foreman: Foreman, stub: Stub) -> None:
    """A running job cancelled says `request cancelled`, as a queued one says `cancelled before it ran`."""
    first = await hold_worker(http, foreman, stub, "llama3")
    queued = await submit_async(foreman, "mistral", "never")
    running = foreman.jobs()[0]["id"]
    for job_id in (queued, running):
        assert (await ctl(foreman.url, "cancel", job_id)).code == 0
    await first
    errors = {job["id"]: job["error"] for job in foreman.jobs()}
    assert errors == {running: "request cancelled", queued: "cancelled before it ran"}


async def test_submit_a_prompt_and_wait_for_the_result(foreman: Foreman) -> None:
    """`submit --prompt --wait` prints the id, shows progress, then the reply's text."""
    ran = await ctl(
        foreman.url, "submit", "--model", "llama3", "--prompt", "hello", "--wait", "--interval", "0.01"
    )
    job_id = foreman.jobs()[0]["id"]
    assert ran.code == 0
    assert ran.out.splitlines() == [
        f"{job_id} queued, position 0",
        f"--- {job_id} llama3 done",
        reply_text("llama3", "hello"),
    ]
    assert ran.err.splitlines()[-1].startswith("1/1 finished: 1 done ")


async def test_submit_a_generate_prompt_without_waiting(foreman: Foreman) -> None:
    """--generate sends the prompt to /api/generate; without --wait only the id is printed."""
    ran = await ctl(foreman.url, "submit", "--model", "mistral", "--prompt", "hi", "--generate", "--json")
    accepted = json.loads(ran.out)
    assert accepted["state"] == "queued"
    assert [job["endpoint"] for job in foreman.jobs()] == ["/api/generate"]
    await foreman.wait_states(lambda states: states == ["done"])


async def test_submit_a_file_and_again_without_new_jobs(foreman: Foreman, stub: Stub, tmp_path: Path) -> None:
    """A JSONL file becomes one job per line; running the same file again returns the same jobs."""
    batch = tmp_path / "batch.jsonl"
    lines = [
        chat_body("llama3", "one"),
        {"model": "mistral", "prompt": "two", "endpoint": "/api/generate"},
        None,
        {"model": "nomic-embed-text", "input": "three", "endpoint": "embed"},
    ]
    batch.write_text("\n".join("" if body is None else json.dumps(body) for body in lines) + "\n")
    ran = await ctl(foreman.url, "submit", "--file", str(batch), "--wait", "--interval", "0.01")
    assert ran.code == 0, ran.err
    ids = [job["id"] for job in foreman.jobs()]
    assert [line.split()[0] for line in ran.out.splitlines()[:3]] == ids
    outcomes = ran.out.splitlines()[3:]
    assert outcomes == [
        f"--- batch.jsonl:1 {ids[0]} llama3 done",
        reply_text("llama3", "one"),
        f"--- batch.jsonl:2 {ids[1]} mistral done",
        reply_text("mistral", "two"),
        f"--- batch.jsonl:4 {ids[2]} nomic-embed-text done",
        "1 embedding(s) of 8 dimensions",
    ]
    served = len(stub.inference_requests())
    again = await ctl(foreman.url, "submit", "--file", str(batch))
    assert again.out.splitlines() == [
        f"{ids[0]} done batch.jsonl:1",
        f"{ids[1]} done batch.jsonl:2",
        f"{ids[2]} done batch.jsonl:4",
    ]
    assert len(foreman.jobs()) == 3 and len(stub.inference_requests()) == served


async def test_submit_wait_on_a_batch_follows_the_queue(foreman: Foreman, tmp_path: Path) -> None:
    """A batch too big to fetch job by job every round still ends with every result, in file order."""
    models = ["llama3", "mistral", "qwen2"] * 4
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps(chat_body(m, f"n{i}")) + "\n" for i, m in enumerate(models)))
    ran = await ctl(foreman.url, "submit", "--file", str(batch), "--wait", "--json", "--interval", "0.01")
    assert ran.code == 0, ran.err
    ended = [json.loads(line) for line in ran.out.splitlines()]
    assert [job["result"]["message"]["content"] for job in ended] == [
        reply_text(m, f"n{i}") for i, m in enumerate(models)
    ]


async def test_queued_ids_pages_back_to_the_oldest_job_asked_for(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """The queue is read a page at a time, newest first, and no further than needed."""
    first = await hold_worker(http, foreman, stub, "llama3")
    ids = [await submit_async(foreman, "mistral", f"q{i}") for i in range(5)]
    async with Daemon.connect(foreman.url) as daemon:
        assert await daemon.queued_ids(ids[1], page_size=2) == set(ids[1:])
        assert await daemon.queued_ids(ids[4], page_size=2) == set(ids[3:])
    stub.faults.release_hung()
    await first


async def test_submit_goes_on_past_a_rejected_line_and_exits_1(foreman: Foreman, tmp_path: Path) -> None:
    """A line the daemon refuses is reported by its line number; the others run; a failed job is exit 1."""
    batch = tmp_path / "batch.jsonl"
    unable = '{"model": "nomic-embed-text", "messages": [{"role": "user", "content": "x"}]}'  # cannot chat
    batch.write_text(
        f'{{"messages": []}}\n{{"model": "nope", "messages": []}}\n{unable}\n{{"model": "llama3", "prompt": "ok"}}\n'
    )
    ran = await ctl(foreman.url, "submit", "--file", str(batch), "--wait", "--json", "--interval", "0.01")
    assert ran.code == 1
    assert "foreman submit: batch.jsonl:1: model is required\n" in ran.err
    assert "foreman submit: batch.jsonl:2: model 'nope' not found\n" in ran.err
    ended = [json.loads(line) for line in ran.out.splitlines()]
    assert [(job["model"], job["state"]) for job in ended] == [
        ("nomic-embed-text", "failed"),
        ("llama3", "done"),
    ]
    assert ran.err.splitlines()[-1].startswith("2/2 finished: 1 done, 1 failed ")


async def test_a_refused_prompt_names_the_command(foreman: Foreman) -> None:
    """`foreman submit: model 'nosuch' not found`, not `foreman: request: ...`."""
    ran = await ctl(foreman.url, "submit", "--model", "nosuch", "--prompt", "hi")
    assert ran == Ran(1, "", "foreman submit: model 'nosuch' not found\n")


async def test_submit_wait_on_a_terminal_draws_one_bar(foreman: Foreman, tmp_path: Path) -> None:
    """On a terminal, --wait redraws one bar with done, failed, total, rate and time left."""
    batch = tmp_path / "batch.jsonl"
    batch.write_text(
        json.dumps(chat_body("llama3", "a")) + "\n" + json.dumps(chat_body("llama3", "b")) + "\n"
    )
    args = build_parser({}, isatty=False).parse_args(
        ["submit", "--file", str(batch), "--wait", "--interval", "0.01", "--host", foreman.url]
    )
    err = Terminal()
    assert await run_command(args, io.StringIO(), err) == 0
    frames = err.getvalue().split("\r")[1:]
    assert frames and "\n" not in "".join(frames[:-1]) and err.getvalue().endswith("\n")
    assert re.fullmatch(r"\[#{30}\] 2 done of 2  [0-9.]+/s  0\.0s left\x1b\[K\n", frames[-1])


async def test_submit_a_bad_file_sends_nothing(foreman: Foreman, tmp_path: Path) -> None:
    """A file with a line that is not JSON is refused before anything is submitted."""
    batch = tmp_path / "batch.jsonl"
    batch.write_text('{"model": "llama3"}\n{"model":\n')
    ran = await ctl(foreman.url, "submit", "--file", str(batch))
    assert ran.code == 1 and ran.err.startswith("foreman submit: batch.jsonl:2: not JSON")
    missing = await ctl(foreman.url, "submit", "--file", str(tmp_path / "missing.jsonl"))
    assert missing.code == 1 and "cannot read" in missing.err
    assert foreman.jobs() == []


async def test_watch_appends_snapshots_when_not_a_terminal(foreman: Foreman) -> None:
    """`watch --count 2` draws two plain frames and stops; no ANSI codes into a pipe or file."""
    ran = await ctl(foreman.url, "watch", "--count", "2", "--interval", "0")
    assert ran.code == 0 and ran.out.count(f"foreman at {foreman.url}") == 2
    assert "queue is empty" in ran.out and "\x1b" not in ran.out


async def test_watch_redraws_in_place_on_a_terminal(foreman: Foreman) -> None:
    """On a terminal each frame is drawn from the top over the last, and the cursor comes back at the end."""
    ran = await ctl(foreman.url, "watch", "--count", "2", "--interval", "0", out=Terminal())
    frames = ran.out.split("\x1b[H")
    assert frames[0] == "\x1b[?25l\x1b[2J" and len(frames) == 3
    assert all(
        frame.startswith("foreman at") and "queue is empty\x1b[K\n\x1b[J" in frame for frame in frames[1:]
    )
    assert ran.out.endswith("\x1b[?25h")


async def test_ctrl_c_ends_watch_cleanly(foreman: Foreman) -> None:
    """Ctrl-C stops `foreman watch` with exit code 0 and no traceback."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "foreman",
        "watch",
        "--host",
        foreman.url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    # A generous deadline: a cold interpreter on a loaded CI machine took more than 10 s to draw.
    async with asyncio.timeout(60):
        while not (line := await process.stdout.readline()).startswith(b"queue is empty"):
            assert line, f"watch ended before drawing the queue: {await process.communicate()}"
        process.send_signal(signal.SIGINT)
        _, err = await process.communicate()
    assert (process.returncode, err) == (0, b"")


async def test_an_address_that_is_not_foreman_says_so(stub_server: StubServer) -> None:
    """FOREMAN_HOST pointing at Ollama itself gets a hint, not a JSON error."""
    ran = await ctl(stub_server.url, "status")
    assert ran == Ran(
        1,
        "",
        f"foreman status: {stub_server.url}/status answered 404 with something other than foreman's JSON;"
        " is that foreman's address?\n",
    )


async def test_foreman_token_goes_with_the_requests(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
) -> None:
    """With FOREMAN_TOKEN set, requests carry it as a bearer token; a 401 is the daemon's message."""
    seen: list[str | None] = []

    async def status(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response(
            {"error": "unauthorized: send Authorization: Bearer <FOREMAN_TOKEN>"}, status=401
        )

    app = web.Application()
    app.router.add_get("/status", status)
    server = await aiohttp_server(app)
    ran = await ctl(str(server.make_url("")).rstrip("/"), "status", environ={"FOREMAN_TOKEN": "s3cret"})
    assert ran == Ran(1, "", "foreman status: unauthorized: send Authorization: Bearer <FOREMAN_TOKEN>\n")
    assert seen == ["Bearer s3cret"]


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["jobs"],
        ["job", "01JQ0000000000000000000000"],
        ["cancel", "01JQ0000000000000000000000"],
        ["submit", "--model", "llama3", "--prompt", "hi"],
        ["watch", "--count", "1"],
    ],
)
async def test_an_unreachable_daemon_is_one_line_and_exit_1(argv: list[str], dead_port: int) -> None:
    """Every command says in one line that the daemon is not there, and exits 1."""
    ran = await ctl(f"127.0.0.1:{dead_port}", *argv)
    assert ran == Ran(
        1,
        "",
        f"foreman {argv[0]}: cannot reach the daemon at http://127.0.0.1:{dead_port} (connection refused);"
        ' is "foreman serve" running?\n',
    )


def test_main_finds_the_daemon_through_foreman_host(
    dead_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """`foreman status` with FOREMAN_HOST=:port looks on this machine, and fails without a traceback."""
    assert main(["status"], {"FOREMAN_HOST": f":{dead_port}"}) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(
        f"foreman status: cannot reach the daemon at http://127.0.0.1:{dead_port} "
    )


def test_a_bad_number_names_its_option(capsys: pytest.CaptureFixture[str]) -> None:
    """`--limit 0` says which option and why, not `invalid _page_size value`."""
    for argv, message in (
        (["jobs", "--limit", "0"], "argument --limit: must be at least 1, got 0"),
        (["jobs", "--limit", "ten"], "argument --limit: not a whole number: 'ten'"),
        (["watch", "--count", "0"], "argument --count: must be at least 1, got 0"),
        (["watch", "--interval", "soon"], "argument --interval: "),
    ):
        with pytest.raises(SystemExit) as exited:
            main(argv, {})
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "invalid" not in err.splitlines()[-1], err


def test_submit_needs_a_model_for_a_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    """--prompt without --model is a usage error, as is --model with --file."""
    for argv in (["submit", "--prompt", "hi"], ["submit", "--file", "x.jsonl", "--model", "llama3"]):
        with pytest.raises(SystemExit) as exited:
            main(argv, {})
        assert exited.value.code == 2
    assert "submit --prompt needs --model" in capsys.readouterr().err
