"""Model routing through the daemon: aliases served by a resident model, intent routes, the model lists."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import aiohttp
import ollama
import openai
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from foreman.api.keys import ROUTES, STORAGE
from foreman.app import create_app
from foreman.cli import main
from foreman.config import Config
from foreman.routing.routes_file import RoutesError
from stub_ollama import Stub, StubServer
from tests.support.helpers import (
    ASYNC,
    Foreman,
    MakeForeman,
    MakeStub,
    chat_body,
    eventually,
    hold_worker,
    post,
    submit,
)

ROUTES_FILE = """
[alias.fast]
models = ["qwen2", "mistral"]
options = { temperature = 0.2 }
keep_alive = "10m"

[alias.coder]
models = ["llama3"]
options = { temperature = 0.0 }

[alias.embedder]
models = ["nomic-embed-text"]

[route.auto]
rules = [ { match = '(?i)\\b(code|python|bug)\\b', use = "coder" } ]
default = "fast"
"""


@pytest.fixture
def routes_file(tmp_path: Path) -> Path:
    path = tmp_path / "routes.toml"
    path.write_text(ROUTES_FILE)
    return path


@pytest.fixture
async def routed(make_foreman: MakeForeman, stub_server: StubServer, routes_file: Path) -> Foreman:
    return await make_foreman(stub_server.url, routes=routes_file)


def served_models(stub: Stub) -> list[str | None]:
    return [r.model for r in stub.inference_requests()]


async def test_an_alias_is_served_by_the_model_ollama_holds(
    http: aiohttp.ClientSession, routed: Foreman, stub: Stub
) -> None:
    """With mistral loaded, jobs for `fast` (qwen2 or mistral) run on mistral: no swap."""
    first = await hold_worker(http, routed, stub, "mistral")
    with capture_logs() as logs:
        tasks = [await submit(http, routed, chat_body("fast", f"q{i}")) for i in range(2)]
        stub.faults.release_hung()
        answers = await asyncio.gather(first, *tasks)
    assert [a.status for a in answers] == [200] * 3
    assert [a.json()["model"] for a in answers[1:]] == ["mistral:latest"] * 2
    assert [a.headers["X-Foreman-Model"] for a in answers] == ["mistral", "mistral:latest", "mistral:latest"]
    assert stub.loads == ["mistral:latest"]
    assert served_models(stub) == ["mistral", "mistral:latest", "mistral:latest"]
    options = [r.body["options"] for r in stub.inference_requests()[1:] if r.body]
    assert options == [{"temperature": 0.2}] * 2
    routed_lines = [e for e in logs if e["event"] == "job.routed"]
    assert [(e["alias"], e["model"], e["why"], e["route"]) for e in routed_lines] == [
        ("fast", "mistral:latest", "resident", None)
    ] * 2
    listed = (await (await routed.client.get("/jobs?limit=1")).json())["jobs"][0]
    assert (listed["model"], listed["alias"], listed["route"], listed["served_model"]) == (
        "fast",
        "fast",
        None,
        "mistral:latest",
    )
    assert listed["model_key"] == "@fast(qwen2:latest|mistral:latest)"


async def test_a_batch_mixing_an_alias_and_one_of_its_models_loads_once(
    http: aiohttp.ClientSession, routed: Foreman, stub: Stub
) -> None:
    """`fast` jobs queued beside mistral jobs ride along on mistral's load instead of loading qwen2."""
    first = await hold_worker(http, routed, stub, "llama3")
    order = ["fast", "mistral", "fast", "mistral", "fast"]
    with capture_logs() as logs:
        tasks = [await submit(http, routed, chat_body(m, f"job {i}")) for i, m in enumerate(order)]
        stub.faults.release_hung()
        answers = await asyncio.gather(first, *tasks)
    assert [a.status for a in answers] == [200] * 6
    assert stub.loads == ["llama3:latest", "mistral:latest"]
    assert {a.json()["model"] for a in answers[1:]} == {"mistral", "mistral:latest"}
    whys = [e["why"] for e in logs if e["event"] == "job.routed"]
    assert whys[0] == "queued" and set(whys) <= {"queued", "resident"}
    assert await routed.app[STORAGE].waiting_by_model() == {}


async def test_with_none_of_its_models_loaded_an_alias_takes_the_first(
    http: aiohttp.ClientSession, routed: Foreman, stub: Stub
) -> None:
    """No acceptable model is resident and nothing else wants one: the first in order serves."""
    first = await hold_worker(http, routed, stub, "llama3")
    with capture_logs() as logs:
        task = await submit(http, routed, chat_body("fast"))
        stub.faults.release_hung()
        await first
        answer = await task
    assert answer.json()["model"] == "qwen2:latest" and answer.headers["X-Foreman-Model"] == "qwen2:latest"
    assert stub.loads == ["llama3:latest", "qwen2:latest"]
    [line] = [e for e in logs if e["event"] == "job.routed"]
    assert (line["model"], line["why"]) == ("qwen2:latest", "preferred")


async def test_a_route_chooses_the_alias_by_what_the_user_asked(
    http: aiohttp.ClientSession, routed: Foreman, stub: Stub
) -> None:
    """`auto` sends a code question to `coder` (llama3, temperature 0) and a chat to `fast`."""
    with capture_logs() as logs:
        code = await post(http, routed.url + "/api/chat", chat_body("auto", "why does this Python fail?"))
        chat = await post(
            http, routed.url + "/api/generate", {"model": "auto", "prompt": "hi", "stream": False}
        )
    assert code.json()["model"] == "llama3:latest"
    assert chat.json()["model"] == "qwen2:latest"
    code_request, chat_request = stub.inference_requests()
    assert code_request.body is not None and code_request.body["options"] == {"temperature": 0.0}
    assert chat_request.body is not None and chat_request.body["keep_alive"] == "10m"
    lines = [e for e in logs if e["event"] == "job.routed"]
    assert [(e["route"], e["alias"], e["rule"], e["model"], e["why"]) for e in lines] == [
        ("auto", "coder", "(?i)\\b(code|python|bug)\\b", "llama3:latest", "preferred"),
        ("auto", "fast", None, "qwen2:latest", "preferred"),
    ]
    jobs = (await (await routed.client.get("/jobs")).json())["jobs"]
    assert [(j["model"], j["route"], j["alias"], j["served_model"]) for j in jobs] == [
        ("auto", "auto", "fast", "qwen2:latest"),
        ("auto", "auto", "coder", "llama3:latest"),
    ]
    coder_jobs = (await (await routed.client.get("/jobs?model=coder")).json())["jobs"]
    assert [j["alias"] for j in coder_jobs] == ["coder"]


async def test_aliases_work_for_generate_embed_and_the_official_ollama_client(
    routed: Foreman, stub: Stub, ollama_client: Callable[[str], ollama.AsyncClient]
) -> None:
    """The ollama client asks for aliases like models, streamed or not, and sees the served model."""
    client = ollama_client(routed.url)
    generated = await client.generate(model="fast", prompt="hello")
    assert generated.model == "qwen2:latest"
    chunks = [
        c
        async for c in await client.chat(
            model="fast", messages=[{"role": "user", "content": "x"}], stream=True
        )
    ]
    assert {c.model for c in chunks} == {"qwen2:latest"}
    embedded = await client.embed(model="embedder", input=["a", "b"])
    assert embedded.model == "nomic-embed-text:latest" and len(embedded.embeddings) == 2


async def test_streamed_replies_name_the_served_model_in_the_header(
    http: aiohttp.ClientSession, routed: Foreman
) -> None:
    """A streamed reply for an alias carries X-Foreman-Model, and every chunk names the model."""
    answer = await post(http, routed.url + "/api/chat", {**chat_body("fast"), "stream": True})
    assert answer.headers["X-Foreman-Model"] == "qwen2:latest"
    assert {line["model"] for line in answer.lines()} == {"qwen2:latest"}


async def test_the_openai_api_takes_aliases(
    routed: Foreman, stub: Stub, openai_client: Callable[[str], openai.AsyncOpenAI]
) -> None:
    """/v1 chat and embeddings for an alias: the served model in the reply, the alias's options as fields."""
    client = openai_client(routed.url)
    reply = await client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}])
    assert reply.model == "qwen2:latest"
    request = stub.inference_requests()[-1]
    assert request.body is not None and request.body["temperature"] == 0.2 and "options" not in request.body
    vectors = await client.embeddings.create(model="embedder", input="x")
    assert vectors.model == "nomic-embed-text:latest"
    listed = {m.id async for m in client.models.list()}
    assert {"fast", "coder", "embedder", "auto", "llama3:latest"} <= listed
    one = await client.models.retrieve("fast")
    assert one.id == "fast"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("nothing-here")


async def test_async_jobs_show_the_alias_and_the_served_model(
    http: aiohttp.ClientSession, routed: Foreman
) -> None:
    """A 202 job for a route shows route, alias and served model; its result names the model."""
    accepted = await post(http, routed.url + "/api/chat", chat_body("auto", "a bug"), ASYNC)
    job_id = accepted.json()["id"]

    async def done() -> dict[str, object]:
        view: dict[str, object] = await (await routed.client.get(f"/jobs/{job_id}")).json()
        return view

    await eventually(lambda: routed.states() == ["done"], what="the job to finish")
    view = await done()
    assert (view["route"], view["alias"], view["served_model"]) == ("auto", "coder", "llama3:latest")
    result = view["result"]
    assert isinstance(result, dict) and result["model"] == "llama3:latest"


async def test_an_alias_job_that_fails_once_is_retried_and_counted_right(
    http: aiohttp.ClientSession, routed: Foreman, stub: Stub
) -> None:
    """A transient failure puts the alias job back under its alias; it runs again and nothing is left counted."""
    stub.faults.fail_next(1, status=500)
    async with asyncio.timeout(10):  # counted under the wrong key, the job would never run again
        answer = await post(http, routed.url + "/api/chat", chat_body("fast"))
    assert answer.status == 200 and answer.json()["model"] == "qwen2:latest"
    [job] = routed.jobs()
    assert (job["attempt"], job["served_model"]) == (1, "qwen2:latest")
    assert await routed.app[STORAGE].waiting_by_model() == {}
    plain = await post(http, routed.url + "/api/chat", chat_body("llama3"))
    assert plain.status == 200


async def test_model_lists_offer_aliases_and_routes(
    http: aiohttp.ClientSession, routed: Foreman, stub_server: StubServer
) -> None:
    """/api/tags lists aliases and routes with their first model's details; /api/show answers for it."""
    async with http.get(stub_server.url + "/api/tags") as response:
        real = (await response.json())["models"]
    async with http.get(routed.url + "/api/tags") as response:
        assert response.status == 200
        listed = (await response.json())["models"]
    assert listed[: len(real)] == real
    extra = {m["name"]: m for m in listed[len(real) :]}
    assert list(extra) == ["fast", "coder", "embedder", "auto"]
    qwen2 = next(m for m in real if m["name"] == "qwen2:latest")
    assert extra["fast"] == {**qwen2, "name": "fast", "model": "fast"}
    assert extra["auto"]["details"] == qwen2["details"]
    shown = await post(http, routed.url + "/api/show", {"model": "coder"})
    direct = await post(http, stub_server.url + "/api/show", {"model": "llama3"})
    assert shown.status == 200 and shown.json() == direct.json()
    missing = await post(http, routed.url + "/api/show", {"model": "nothing"})
    assert missing.status == 404


async def test_without_a_routes_file_the_lists_pass_through(
    http: aiohttp.ClientSession, foreman: Foreman, stub_server: StubServer
) -> None:
    """No FOREMAN_ROUTES: /api/tags is Ollama's own answer, byte for byte."""
    async with http.get(stub_server.url + "/api/tags") as response:
        real = await response.read()
    async with http.get(foreman.url + "/api/tags") as response:
        assert await response.read() == real


async def test_a_wrong_routes_file_stops_foreman_at_start(stub_server: StubServer, tmp_path: Path) -> None:
    """A bad file, or an alias named like one of Ollama's models, refuses to start."""
    path = tmp_path / "routes.toml"
    config = Config(db_path=tmp_path / "q.db", upstream=stub_server.url, routes=path)
    for text, message in [
        ("[alias.fast]\nmodels = 'qwen2'\n", "alias.fast: models must be a list"),
        ("[alias.llama3]\nmodels = ['qwen2']\n", "alias.llama3: shadows the model 'llama3:latest'"),
    ]:
        path.write_text(text)
        runner = web.AppRunner(create_app(config))
        with pytest.raises(RoutesError, match=message):
            await runner.setup()
        await runner.cleanup()
        assert not config.db_path.exists()  # refused before anything started


async def test_with_ollama_down_the_names_are_checked_at_the_next_reload(
    make_stub: MakeStub, make_foreman: MakeForeman, routes_file: Path
) -> None:
    """foreman starts without Ollama, as always; it says it could not check the names."""
    server = await make_stub()
    await server.stop_listening()
    with capture_logs() as logs:
        foreman = await make_foreman(server.url, routes=routes_file)
    assert foreman.app[ROUTES].current
    assert any(e["event"] == "routes.unchecked" for e in logs)


def test_serve_refuses_a_bad_routes_file_with_one_line_and_exit_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`foreman serve --routes` with a bad regex says which entry in one line, exits 78, no traceback."""
    path = tmp_path / "routes.toml"
    path.write_text("[alias.fast]\nmodels = ['x']\n[route.auto]\nrules = [{ match = '(', use = 'fast' }]\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["serve", "--host", f"127.0.0.1:{port}", "--db", str(tmp_path / "q.db"), "--log-format", "json"]
    argv += ["--routes", str(path), "--upstream", f"http://127.0.0.1:{port}"]
    assert main(argv, environ={}) == 78
    out = capsys.readouterr().out
    errors = [json.loads(line) for line in out.splitlines() if '"error"' in line and "level" in line]
    [refused] = [e for e in errors if e.get("level") == "error"]
    assert refused["event"] == "foreman.routes_refused"
    assert refused["error"].startswith(f"{path}: route.auto.rules[0]: bad regex '('")
    assert "Traceback" not in out


async def test_sighup_reloads_the_routes_and_a_bad_reload_keeps_them(
    http: aiohttp.ClientSession, routed: Foreman, routes_file: Path
) -> None:
    """SIGHUP reads the file again; if the new file is wrong, the old routes stay and the log says why."""
    table = routed.app[ROUTES]
    assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN, None)
    await asyncio.to_thread(routes_file.write_text, ROUTES_FILE + '\n[alias.slow]\nmodels = ["llama3"]\n')
    with capture_logs() as logs:
        os.kill(os.getpid(), signal.SIGHUP)
        await eventually(lambda: "slow:latest" in table.current.aliases, what="the reload")
        answer = await post(http, routed.url + "/api/chat", chat_body("slow"))
        assert answer.json()["model"] == "llama3:latest"
        await asyncio.to_thread(routes_file.write_text, '[alias.slow]\nmodels = ["llama3"]\nmodel = "x"\n')
        os.kill(os.getpid(), signal.SIGHUP)
        await eventually(lambda: any(e["event"] == "routes.reload_failed" for e in logs), what="the refusal")
    failed = next(e for e in logs if e["event"] == "routes.reload_failed")
    assert "alias.slow: unknown field 'model'" in failed["error"]
    assert "slow:latest" in table.current.aliases and "fast:latest" in table.current.aliases
    assert [e["event"] for e in logs if e["event"].startswith("routes.")] == [
        "routes.reloaded",
        "routes.reload_failed",
    ]


async def test_without_a_routes_file_sighup_is_harmless(
    http: aiohttp.ClientSession, foreman: Foreman
) -> None:
    """SIGHUP with no FOREMAN_ROUTES is logged and ignored instead of ending the daemon."""
    assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN, None)
    with capture_logs() as logs:
        os.kill(os.getpid(), signal.SIGHUP)
        await eventually(lambda: any(e["event"] == "routes.reload_skipped" for e in logs), what="the skip")
    answer = await post(http, foreman.url + "/api/chat", chat_body("llama3"))
    assert answer.status == 200


async def test_queued_alias_jobs_keep_their_models_across_a_restart_without_the_alias(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman, routes_file: Path
) -> None:
    """An alias job accepted before a restart runs on its alias's models even if the new file drops the alias."""
    server = await make_stub()
    stub = server.stub
    first = await make_foreman(server.url, routes=routes_file, shutdown_grace=0)
    stub.faults.hang_next(1)
    held = await submit(http, first, chat_body("llama3", "running"))
    await stub.wait_for(lambda s: s.faults.hung == 1)
    queued = await submit(http, first, chat_body("fast", "queued"))
    await first.close()
    assert {(await held).status, (await queued).status} == {503}
    await asyncio.to_thread(routes_file.write_text, '[alias.other]\nmodels = ["llama3"]\n')
    second = await make_foreman(server.url, routes=routes_file)
    await second.wait_states(lambda states: states == ["done", "done"], "both jobs to finish")
    rows = second.jobs()
    assert rows[1]["served_model"] in ("qwen2:latest", "mistral:latest")
    assert [r.model for r in stub.inference_requests() if r.outcome == "ok"][-1] == rows[1]["served_model"]
