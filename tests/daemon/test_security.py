"""Who gets in: DNS-rebinding guard, CORS like Ollama's, and the bearer token."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import ollama
import pytest

from foreman.cli import build_parser, main, serve_config
from stub_ollama import StubServer
from tests.support.helpers import Foreman, MakeForeman, chat_body


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example.com:11435", "localhost.evil.example", "8.8.8.8", "[::1]", "local"],
)
async def test_foreign_host_headers_are_refused(foreman: Foreman, host: str) -> None:
    """A request naming another server in Host (DNS rebinding) gets 403 with an empty body."""
    answer = await foreman.client.get("/api/tags", headers={"Host": host})
    assert answer.status == 403 and await answer.read() == b""
    answer = await foreman.client.post("/api/chat", json=chat_body("llama3"), headers={"Host": host})
    assert answer.status == 403 and foreman.jobs() == []


@pytest.mark.parametrize(
    "host",
    [
        "localhost:11435",
        "LOCALHOST",
        "127.0.0.1",
        "127.0.0.2:11435",
        "[::1]:11435",
        "::1",
        "0.0.0.0:11435",
        "192.168.1.5",
        "10.0.0.7:11435",
        "[fd00::5]:11435",
        "app.localhost",
        "myhost.local",
        "host.docker.internal:11435",
        "",
    ],
)
async def test_hosts_ollama_accepts_pass(foreman: Foreman, host: str) -> None:
    """Loopback, private and unspecified addresses and local names are this machine, as for Ollama."""
    answer = await foreman.client.get("/api/version", headers={"Host": host})
    assert answer.status == 200


async def test_the_machines_own_hostname_passes(foreman: Foreman) -> None:
    """The hostname the machine calls itself is accepted, in any case."""
    answer = await foreman.client.get(
        "/api/version", headers={"Host": socket.gethostname().upper() + ":11435"}
    )
    assert answer.status == 200


async def test_a_client_with_ollama_host_0_0_0_0_works(
    foreman: Foreman, ollama_client: Callable[[str], ollama.AsyncClient]
) -> None:
    """OLLAMA_HOST=0.0.0.0:PORT, the common way to write it, reaches foreman through the official client."""
    client = ollama_client(f"0.0.0.0:{foreman.client.port}")
    assert [m.model for m in (await client.list()).models]
    reply = await client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}])
    assert reply.done


async def test_options_for_a_local_name_gets_204(foreman: Foreman) -> None:
    """Ollama answers an OPTIONS request for an accepted name itself, with 204 and no body."""
    answer = await foreman.client.options("/api/tags", headers={"Host": "localhost:11435"})
    assert answer.status == 204 and await answer.read() == b""


async def test_configured_hosts_pass(stub_server: StubServer, make_foreman: MakeForeman) -> None:
    """FOREMAN_ALLOWED_HOSTS adds names, e.g. for a reverse proxy in front."""
    foreman = await make_foreman(stub_server.url, allowed_hosts=("gpu.example.org",))
    assert (await foreman.client.get("/api/version", headers={"Host": "gpu.example.org:8080"})).status == 200


async def test_cors_allows_ollamas_default_origins(foreman: Foreman) -> None:
    """A page on localhost may call foreman, and sees the job header; preflights get 204."""
    origin = "http://localhost:3000"
    answer = await foreman.client.post("/api/chat", json=chat_body("llama3"), headers={"Origin": origin})
    assert answer.status == 200
    assert answer.headers["Access-Control-Allow-Origin"] == origin
    assert answer.headers["Vary"] == "Origin"
    assert "X-Foreman-Job" in answer.headers["Access-Control-Expose-Headers"]
    preflight = await foreman.client.options(
        "/api/chat", headers={"Origin": origin, "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status == 204 and "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert preflight.headers["Access-Control-Allow-Origin"] == origin
    allowed = preflight.headers["Access-Control-Allow-Headers"].split(",")
    assert {"Authorization", "Content-Type", "X-Stainless-Os", "X-Foreman-Priority"} <= set(allowed)
    assert preflight.headers["Access-Control-Max-Age"] == "43200"


async def test_cors_refuses_other_origins(foreman: Foreman) -> None:
    """A page from elsewhere gets 403 with an empty body, as from Ollama."""
    answer = await foreman.client.post(
        "/api/chat", json=chat_body("llama3"), headers={"Origin": "https://evil.example"}
    )
    assert answer.status == 403 and await answer.read() == b""
    assert foreman.jobs() == []


@pytest.mark.parametrize(
    "origin", ["chrome-extension://abcdef", "moz-extension://0f1e2d", "safari-web-extension://x1"]
)
async def test_browser_extensions_need_listing_as_in_ollama(foreman: Foreman, origin: str) -> None:
    """Ollama refuses extension origins until OLLAMA_ORIGINS lists them (its FAQ); so does foreman."""
    answer = await foreman.client.get("/api/version", headers={"Origin": origin})
    assert answer.status == 403


@pytest.mark.parametrize(
    "origin", ["chrome-extension://abcdef", "moz-extension://0f1e2d", "safari-web-extension://x1"]
)
async def test_ollama_origins_in_foremans_environment_count(
    stub_server: StubServer, make_foreman: MakeForeman, tmp_path: Path, origin: str
) -> None:
    """OLLAMA_ORIGINS as Ollama's FAQ writes it for extensions lets them in, beside FOREMAN_ORIGINS."""
    environ = {
        "OLLAMA_ORIGINS": "chrome-extension://*,moz-extension://*,safari-web-extension://*",
        "FOREMAN_ORIGINS": "https://app.example.org",
        "XDG_STATE_HOME": str(tmp_path),
    }
    args = build_parser(environ, isatty=False).parse_args(["serve"])
    origins = serve_config(args, environ).origins
    foreman = await make_foreman(stub_server.url, origins=origins)
    for allowed in (origin, "https://app.example.org"):
        answer = await foreman.client.get("/api/version", headers={"Origin": allowed})
        assert answer.status == 200 and answer.headers["Access-Control-Allow-Origin"] == allowed


@pytest.mark.parametrize("variable", ["OLLAMA_ORIGINS", "FOREMAN_ORIGINS"])
def test_an_origin_ollama_would_not_start_with_stops_foreman(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], variable: str
) -> None:
    """An origin with no scheme and no wildcard stops the start with one line, as it stops Ollama."""
    assert main(["serve", "--db", str(tmp_path / "q.db")], environ={variable: "example.org"}) == 78
    err = capsys.readouterr().err
    assert variable in err and "example.org" in err and "Traceback" not in err


async def test_extra_origins_take_wildcards(stub_server: StubServer, make_foreman: MakeForeman) -> None:
    """FOREMAN_ORIGINS works like OLLAMA_ORIGINS, wildcards included."""
    foreman = await make_foreman(stub_server.url, origins=("chrome-extension://*",))
    answer = await foreman.client.get("/api/version", headers={"Origin": "chrome-extension://abcdef"})
    assert (
        answer.status == 200 and answer.headers["Access-Control-Allow-Origin"] == "chrome-extension://abcdef"
    )


async def test_streamed_replies_carry_cors_headers(foreman: Foreman) -> None:
    """Headers sent from inside a streaming handler still carry the CORS grant."""
    body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
    answer = await foreman.client.post("/api/chat", json=body, headers={"Origin": "http://127.0.0.1:8080"})
    assert answer.headers["Content-Type"] == "application/x-ndjson"
    assert answer.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:8080"
    await answer.read()


@pytest.fixture
async def guarded(stub_server: StubServer, make_foreman: MakeForeman) -> Foreman:
    return await make_foreman(stub_server.url, token="s3cret")


async def test_token_is_required_everywhere_but_healthz(guarded: Foreman) -> None:
    """With FOREMAN_TOKEN set, every endpoint needs the bearer token; /healthz stays open."""
    for method, path in [
        ("POST", "/api/chat"),
        ("GET", "/api/tags"),
        ("OPTIONS", "/api/tags"),  # not a CORS preflight (no Origin): no way around the token
        ("GET", "/jobs"),
        ("GET", "/status"),
    ]:
        answer = await guarded.client.request(method, path, json=chat_body("llama3"))
        assert answer.status == 401, path
        assert answer.headers["WWW-Authenticate"] == 'Bearer realm="foreman"'
        assert "FOREMAN_TOKEN" in (await answer.json())["error"]
    openai = await guarded.client.post("/v1/chat/completions", json=chat_body("llama3"))
    assert openai.status == 401
    assert "FOREMAN_TOKEN" in (await openai.json())["error"]["message"]  # OpenAI's error shape
    wrong = await guarded.client.get("/status", headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401
    assert (await guarded.client.get("/healthz")).status == 200
    assert guarded.jobs() == []


async def test_ollama_clients_that_send_a_bearer_token_work(
    guarded: Foreman, stub_server: StubServer
) -> None:
    """ollama-python sends OLLAMA_API_KEY as a bearer token: with the right key, it just works."""
    import ollama

    client = ollama.AsyncClient(host=guarded.url, headers={"Authorization": "Bearer s3cret"}, trust_env=False)
    try:
        response = await client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}])
        assert response.done
        assert [m.model for m in (await client.list()).models]
    finally:
        await client.close()  # type: ignore[no-untyped-call]


def test_a_public_bind_without_a_token_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Binding beyond loopback with no token logs a warning before anything else."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The port is taken, so the start fails right after the warning.
        argv = ["serve", "--host", f"0.0.0.0:{port}", "--db", str(tmp_path / "q.db"), "--log-format", "json"]
        assert main(argv, environ={}) == 1
    out = capsys.readouterr().out
    assert "foreman.exposed" in out and "FOREMAN_TOKEN" in out
