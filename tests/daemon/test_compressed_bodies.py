"""Request bodies sent compressed (`Content-Encoding: zstd`, as Codex does, or gzip) are decoded as Ollama decodes them."""

from __future__ import annotations

import gzip
import json

import aiohttp
from backports import zstd

from stub_ollama import Stub
from tests.support.helpers import Foreman, chat_body, post, reply_text


async def test_zstd_body_becomes_a_job_with_the_decoded_body(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """A zstd /v1/responses body is answered, and the job stores (and Ollama gets) the plain JSON."""
    body = {"model": "llama3", "input": "compressed"}
    answer = await post(
        http,
        foreman.url + "/v1/responses",
        zstd.compress(json.dumps(body).encode()),
        {"Content-Encoding": "zstd"},
    )
    assert answer.status == 200, answer.body
    assert answer.json()["output"][0]["content"][0]["text"] == reply_text("llama3", "compressed")
    [job] = foreman.jobs()
    assert json.loads(job["body"]) == body
    [upstream] = stub.inference_requests()
    assert upstream.body == body


async def test_gzip_body_is_decoded_too(http: aiohttp.ClientSession, foreman: Foreman) -> None:
    """A gzip /api/chat body is a job like any other."""
    body = chat_body("mistral", "zipped")
    answer = await post(
        http,
        foreman.url + "/api/chat",
        gzip.compress(json.dumps(body).encode()),
        {"Content-Encoding": "gzip"},
    )
    assert answer.status == 200, answer.body
    assert answer.json()["message"]["content"] == reply_text("mistral", "zipped")
    assert [json.loads(job["body"]) for job in foreman.jobs()] == [body]


async def test_bad_or_huge_zstd_bodies_are_refused(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """Bytes that are not zstd get Ollama's 400; a body that decodes past Ollama's 20 MiB gets 413; no job."""
    answer = await post(http, foreman.url + "/v1/responses", b"not zstd at all", {"Content-Encoding": "zstd"})
    assert (answer.status, answer.json()["error"]["message"]) == (400, "failed to decompress zstd body")
    cut = zstd.compress(json.dumps({"model": "llama3", "input": "hi"}).encode())[:-4]
    answer = await post(http, foreman.url + "/v1/messages", cut, {"Content-Encoding": "zstd"})
    assert answer.status == 400 and answer.json()["type"] == "error"
    huge = json.dumps({"model": "llama3", "input": "x" * (21 << 20)}).encode()
    answer = await post(
        http, foreman.url + "/v1/responses", zstd.compress(huge), {"Content-Encoding": "zstd"}
    )
    assert answer.status == 413 and "larger than" in answer.json()["error"]["message"]
    assert foreman.jobs() == [] and stub.requests == []


async def test_passed_through_body_goes_on_decoded(http: aiohttp.ClientSession, foreman: Foreman) -> None:
    """A compressed body on a passed-through route reaches Ollama as it came, with its Content-Encoding."""
    body = zstd.compress(json.dumps({"model": "llama3"}).encode())
    answer = await post(http, foreman.url + "/api/show", body, {"Content-Encoding": "zstd"})
    assert answer.status == 200, answer.body
    assert answer.json()["details"]["format"] == "gguf"
