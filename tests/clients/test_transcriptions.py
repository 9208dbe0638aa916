"""`/v1/audio/transcriptions` through foreman: a multipart upload queued like any job, its body kept as it came."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import openai
import pytest

from stub_ollama import Stub
from tests.support.helpers import Foreman, chat_body, hold_worker, reply_text, submit

OpenAIClient = Callable[[str], openai.AsyncOpenAI]
AUDIO = b"RIFF\x00\x00\x00\x00WAVEfmt \x10\x00 not really audio \xff\xfe"
PROMPT = "What exact words are spoken in this audio?"  # what Ollama asks the model with the audio


async def test_transcription_is_a_job_with_the_upload_kept(
    foreman: Foreman, stub: Stub, openai_client: OpenAIClient
) -> None:
    """audio.transcriptions.create runs as a job; the job keeps the multipart upload byte for byte."""
    client = openai_client(foreman.url)
    transcript = await client.audio.transcriptions.create(model="llama3", file=("hello.wav", AUDIO))
    assert transcript.text == reply_text("llama3", PROMPT)
    text = await client.audio.transcriptions.create(
        model="llama3", file=("hello.wav", AUDIO), response_format="text"
    )
    assert text == reply_text("llama3", PROMPT)
    first, second = foreman.jobs()
    assert (first["endpoint"], first["model_key"], first["state"]) == (
        "/v1/audio/transcriptions",
        "llama3:latest",
        "done",
    )
    assert first["body"].startswith(b"--") and AUDIO in first["body"]
    assert second["result"] == text.encode()
    [upstream, _] = stub.inference_requests()
    assert upstream.path == "/v1/audio/transcriptions" and upstream.body is not None
    assert upstream.body["file"] == AUDIO


async def test_transcription_drains_with_chat_of_its_model(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub, openai_client: OpenAIClient
) -> None:
    """Queued behind held work with a chat of the same model after it, a transcription is pinned, not rewritten."""
    first = await hold_worker(http, foreman, stub, "mistral")
    client = openai_client(foreman.url)
    transcribing = asyncio.create_task(
        client.audio.transcriptions.create(model="llama3", file=("a.wav", AUDIO))
    )
    await foreman.wait_states(lambda states: len(states) == 2, "the transcription to be queued")
    chat = await submit(http, foreman, chat_body("llama3", "after"))
    stub.faults.release_hung()
    async with asyncio.timeout(20):  # a worker that cannot send the upload leaves them waiting
        transcript, answer, _ = await asyncio.gather(transcribing, chat, first)
    assert transcript.text == reply_text("llama3", PROMPT)
    assert answer.json()["message"]["content"] == reply_text("llama3", "after")
    assert stub.loads == ["mistral:latest", "llama3:latest"]


async def test_empty_upload_is_refused_at_intake(
    foreman: Foreman, stub: Stub, openai_client: OpenAIClient
) -> None:
    """An empty audio file is Ollama's 400, in OpenAI's shape, before anything is queued."""
    with pytest.raises(openai.BadRequestError) as error:
        await openai_client(foreman.url).audio.transcriptions.create(model="llama3", file=("a.wav", b""))
    assert error.value.body == {
        "message": "audio file is empty",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    assert foreman.jobs() == [] and stub.requests == []
