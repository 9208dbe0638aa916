"""Embeddings at scale: queued embed jobs share calls, and a cache keyed by model digest answers repeats."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from foreman.api.keys import MODEL_TAGS
from foreman.embeddings.requests import job_reply, parse_embed, share
from foreman.storage import CacheEntry
from foreman.storage.sqlite.queue_file import QueueFile
from stub_ollama import Stub, StubServer, embedding
from stub_ollama.settings import StubModel
from tests.support.helpers import ASYNC, Answer, Foreman, MakeForeman, MakeStub, eventually, post, submit

MODEL = "nomic-embed-text"
CANONICAL = "nomic-embed-text:latest"


def vector(stub: Stub, text: str, model: str = CANONICAL) -> list[float]:
    """What the stub's model embeds `text` as, under its digest now."""
    installed = stub.find(model)
    assert installed is not None
    return embedding(installed.digest, text, stub.settings.embedding_dims)


def embed_calls(stub: Stub) -> list[list[str]]:
    """The inputs of every /api/embed call the stub served (loads left out), in arrival order."""
    calls = []
    for request in stub.inference_requests():
        if request.path == "/api/embed" and request.body is not None:
            value = request.body.get("input")
            calls.append([value] if isinstance(value, str) else list(value))
    return calls


async def hold(http: aiohttp.ClientSession, foreman: Foreman, stub: Stub) -> asyncio.Task[Answer]:
    """One embed call the stub holds, so that the jobs sent next queue up behind it."""
    stub.faults.hang_next(1)
    task = await submit(http, foreman, {"model": MODEL, "input": "held"}, path="/api/embed")
    await stub.wait_for(lambda s: s.faults.hung == 1)
    return task


async def queue_all(
    http: aiohttp.ClientSession, foreman: Foreman, requests: list[tuple[str, dict[str, Any]]]
) -> list[asyncio.Task[Answer]]:
    """Send each (path, body) and return once foreman has written all of them as jobs."""
    before = len(foreman.jobs())
    tasks = [asyncio.create_task(post(http, foreman.url + path, body)) for path, body in requests]
    await eventually(lambda: len(foreman.jobs()) >= before + len(requests), what="the jobs to be written")
    return tasks


# ------------------------------------------------------------------ coalescing


async def test_queued_embeds_share_one_call_and_each_gets_its_own_vector(
    foreman: Foreman, stub: Stub, http: aiohttp.ClientSession
) -> None:
    """Twelve one-input jobs (native and /v1) waiting together go as one call; every job gets its own text's vector."""
    held = await hold(http, foreman, stub)
    texts = [f"chunk {i}" for i in range(12)]
    requests = [
        ("/api/embed", {"model": MODEL, "input": text})
        if i % 2
        else ("/v1/embeddings", {"model": "nomic-embed-text:latest", "input": text})
        for i, text in enumerate(texts)
    ]
    with capture_logs() as logs:
        tasks = await queue_all(http, foreman, requests)
        stub.faults.release_hung()
        answers = await asyncio.gather(held, *tasks)
    assert all(answer.status == 200 for answer in answers)
    assert embed_calls(stub) == [["held"], texts]
    for text, (path, _), answer in zip(texts, requests, answers[1:], strict=True):
        reply = answer.json()
        if path == "/api/embed":
            assert reply["model"] == MODEL and reply["embeddings"] == [pytest.approx(vector(stub, text))]
            assert reply["prompt_eval_count"] >= 1
        else:
            assert reply["object"] == "list" and reply["model"] == "nomic-embed-text:latest"
            assert reply["data"] == [
                {"object": "embedding", "embedding": pytest.approx(vector(stub, text)), "index": 0}
            ]
            assert reply["usage"]["prompt_tokens"] == reply["usage"]["total_tokens"] >= 1
    # Each job's share of the call's token count adds up to the call's count.
    tokens = sum(
        a.json().get("prompt_eval_count") or a.json().get("usage", {}).get("prompt_tokens", 0)
        for a in answers[1:]
    )
    assert tokens == 2 * 12  # the stub counts words: two per text
    calls = [entry for entry in logs if entry["event"] == "embed.call"]
    assert [(c["jobs"], c["inputs"]) for c in calls] == [(1, 1), (12, 12)]
    assert set(foreman.states()) == {"done"}


async def test_the_openai_client_gets_vectors_in_order_from_a_shared_call(
    foreman: Foreman, stub: Stub, http: aiohttp.ClientSession, openai_client: Any
) -> None:
    """A many-input /v1 request sharing a call with others gets its vectors in its own order, base64 included."""
    held = await hold(http, foreman, stub)
    others = await queue_all(http, foreman, [("/api/embed", {"model": MODEL, "input": ["z", "y"]})])
    client = openai_client(foreman.url)
    floats_task = asyncio.create_task(client.embeddings.create(model=MODEL, input=["c", "a", "b"]))
    packed_task = asyncio.create_task(
        post(
            http,
            foreman.url + "/v1/embeddings",
            {"model": MODEL, "input": ["a", "q"], "encoding_format": "base64"},
        )
    )
    await eventually(lambda: len(foreman.jobs()) == 4, what="four jobs")
    stub.faults.release_hung()
    floats, packed, *_ = await asyncio.gather(floats_task, packed_task, held, *others)
    assert [d.index for d in floats.data] == [0, 1, 2]
    assert [d.embedding for d in floats.data] == [pytest.approx(vector(stub, t)) for t in ("c", "a", "b")]
    data = packed.json()["data"]
    assert [struct.unpack("<8f", base64.b64decode(d["embedding"])) for d in data] == [
        pytest.approx(vector(stub, t)) for t in ("a", "q")
    ]
    # "a" was asked twice but sent once.
    assert sorted(embed_calls(stub)[1]) == ["a", "b", "c", "q", "y", "z"]


async def test_jobs_with_different_parameters_never_share_a_call(
    foreman: Foreman, stub: Stub, http: aiohttp.ClientSession
) -> None:
    """dimensions, truncate and options split jobs apart, and the legacy /api/embeddings is never merged."""
    held = await hold(http, foreman, stub)
    kinds: list[dict[str, Any]] = [
        {},
        {"dimensions": 4},
        {"truncate": False},
        {"options": {"temperature": 0.5}},
    ]
    requests = [
        ("/api/embed", {"model": MODEL, "input": f"{n}-{i}", **extra})
        for n, extra in enumerate(kinds)
        for i in range(2)
    ]
    requests += [("/api/embeddings", {"model": MODEL, "prompt": f"legacy-{i}"}) for i in range(2)]
    tasks = await queue_all(http, foreman, requests)
    stub.faults.release_hung()
    answers = await asyncio.gather(held, *tasks)
    assert all(a.status == 200 for a in answers)
    calls = embed_calls(stub)[1:]
    assert sorted(calls) == [["0-0", "0-1"], ["1-0", "1-1"], ["2-0", "2-1"], ["3-0", "3-1"]]
    by_input = {
        tuple(r.body["input"]): r.body
        for r in stub.inference_requests()
        if r.path == "/api/embed" and r.body and isinstance(r.body["input"], list)
    }
    assert by_input[("1-0", "1-1")]["dimensions"] == 4
    assert by_input[("2-0", "2-1")]["truncate"] is False
    assert by_input[("3-0", "3-1")]["options"] == {"temperature": 0.5}
    assert all(len(v) == 4 for v in answers[3].json()["embeddings"])
    legacy = [r for r in stub.inference_requests() if r.path == "/api/embeddings"]
    assert len(legacy) == 2
    assert answers[-1].json()["embedding"] == pytest.approx(vector(stub, "legacy-1"))


async def test_a_bad_input_in_a_batch_fails_only_its_job(
    make_stub: MakeStub, make_foreman: MakeForeman, http: aiohttp.ClientSession
) -> None:
    """When Ollama refuses a batch, it is retried input by input: only the job with the bad input fails."""
    server = await make_stub(num_ctx=4)
    stub = server.stub
    foreman = await make_foreman(server.url)
    held = await hold(http, foreman, stub)
    long = "far too many words for this tiny context"
    requests = [
        ("/api/embed", {"model": MODEL, "input": "fine one", "truncate": False}),
        ("/api/embed", {"model": MODEL, "input": ["ok", long], "truncate": False}),
        ("/v1/embeddings", {"model": MODEL, "input": "fine two"}),
        ("/api/embed", {"model": MODEL, "input": "fine three", "truncate": False}),
    ]
    tasks = await queue_all(http, foreman, requests)
    stub.faults.release_hung()
    _, first, bad, v1, last = await asyncio.gather(held, *tasks)
    assert bad.status == 400 and bad.json() == {"error": "the input length exceeds the context length"}
    assert first.status == last.status == v1.status == 200
    assert first.json()["embeddings"] == [pytest.approx(vector(stub, "fine one"))]
    assert last.json()["embeddings"] == [pytest.approx(vector(stub, "fine three"))]
    calls = embed_calls(stub)[1:]
    # The /v1 job (truncate on) had its own call; the refused batch of three jobs went again one input at a time.
    assert ["fine two"] in calls
    assert ["fine one", "ok", long, "fine three"] in calls
    assert all(len(call) == 1 for call in calls[calls.index(["fine one", "ok", long, "fine three"]) + 1 :])
    states = {json.loads(job["body"])["input"].__repr__(): job["state"] for job in foreman.jobs()}
    assert states[repr(["ok", long])] == "failed"
    assert sorted(foreman.states()) == ["done"] * 4 + ["failed"]


async def test_a_batch_ollama_fails_is_retried_whole_and_no_job_is_lost(
    foreman: Foreman, stub: Stub, http: aiohttp.ClientSession
) -> None:
    """A 5xx on a shared call puts every job of it back in line; they all complete on the next try."""
    held = await hold(http, foreman, stub)
    tasks = await queue_all(http, foreman, [("/api/embed", {"model": MODEL, "input": t}) for t in "abc"])
    stub.faults.hang_next(1)  # the shared call, held until the failure is armed for it
    stub.faults.release_hung()
    await stub.wait_for(lambda s: s.faults.hung == 1 and len(embed_calls(s)) == 2)
    stub.faults.fail_next(1, status=500)
    stub.faults.release_hung()
    answers = await asyncio.gather(held, *tasks)
    assert [a.json()["embeddings"] for a in answers[1:]] == [[pytest.approx(vector(stub, t))] for t in "abc"]
    assert embed_calls(stub)[1:] == [["a", "b", "c"], ["a", "b", "c"]]
    assert [job["attempt"] for job in foreman.jobs()[1:]] == [1, 1, 1]


async def test_embed_batch_1_turns_coalescing_off(
    stub_server: StubServer, make_foreman: MakeForeman, http: aiohttp.ClientSession
) -> None:
    """FOREMAN_EMBED_BATCH=1: every job is its own call, as before."""
    foreman = await make_foreman(stub_server.url, embed_batch=1)
    stub = stub_server.stub
    held = await hold(http, foreman, stub)
    tasks = await queue_all(http, foreman, [("/api/embed", {"model": MODEL, "input": t}) for t in "abc"])
    stub.faults.release_hung()
    await asyncio.gather(held, *tasks)
    assert embed_calls(stub) == [["held"], ["a"], ["b"], ["c"]]


async def test_a_job_cancelled_in_a_batch_leaves_the_others_their_call(
    foreman: Foreman, stub: Stub, http: aiohttp.ClientSession
) -> None:
    """Cancelling one job of a batch ends it alone; the call goes on for the rest."""
    held = await hold(http, foreman, stub)
    tasks = await queue_all(http, foreman, [("/api/embed", {"model": MODEL, "input": t}) for t in "ab"])
    stub.faults.hang_next(1)
    stub.faults.release_hung()
    await stub.wait_for(lambda s: s.faults.hung == 1 and len(embed_calls(s)) == 2)
    jobs = foreman.jobs()
    victim = next(job["id"] for job in jobs if json.loads(job["body"])["input"] == "a")
    async with http.delete(f"{foreman.url}/jobs/{victim}") as response:
        assert response.status == 200
    stub.faults.release_hung()
    cancelled, kept = await asyncio.gather(*tasks)
    assert cancelled.status == 499
    assert kept.status == 200 and kept.json()["embeddings"] == [pytest.approx(vector(stub, "b"))]
    await held


# ----------------------------------------------------------------------- cache


async def test_a_repeat_is_answered_from_the_cache_sync_and_async(
    foreman: Foreman, stub: Stub, http: aiohttp.ClientSession
) -> None:
    """The same input again costs no Ollama call, sync or async, and is still a job record marked cached."""
    first = await post(http, foreman.url + "/api/embed", {"model": MODEL, "input": ["x", "y"]})
    calls = len(embed_calls(stub))
    again = await post(
        http, foreman.url + "/api/embed", {"model": "nomic-embed-text:latest", "input": ["y", "x"]}
    )
    assert again.status == 200 and len(embed_calls(stub)) == calls
    assert again.json()["embeddings"] == list(reversed(first.json()["embeddings"]))
    assert again.json()["model"] == "nomic-embed-text:latest"
    assert again.json()["prompt_eval_count"] == first.json()["prompt_eval_count"]
    job_id = again.headers["X-Foreman-Job"]
    async with http.get(f"{foreman.url}/jobs/{job_id}") as response:
        job = await response.json()
    assert job["state"] == "done" and job["cache"] == "hit" and job["result"] == again.json()

    accepted = await post(http, foreman.url + "/v1/embeddings", {"model": MODEL, "input": "x"}, ASYNC)
    assert accepted.status == 202 and accepted.json()["state"] == "done"
    async with http.get(f"{foreman.url}/jobs/{accepted.json()['id']}") as response:
        job = await response.json()
    assert job["cache"] == "hit" and job["result"]["data"][0]["embedding"] == first.json()["embeddings"][0]
    assert len(embed_calls(stub)) == calls


async def test_a_partial_hit_sends_only_what_is_missing(
    foreman: Foreman, stub: Stub, http: aiohttp.ClientSession
) -> None:
    """Inputs the cache holds are not sent again; the job says it was partly served from the cache."""
    await post(http, foreman.url + "/api/embed", {"model": MODEL, "input": "known"})
    answer = await post(http, foreman.url + "/api/embed", {"model": MODEL, "input": ["new", "known"]})
    assert embed_calls(stub)[-1] == ["new"]
    assert answer.json()["embeddings"] == [pytest.approx(vector(stub, t)) for t in ("new", "known")]
    assert foreman.jobs()[-1]["cache"] == "partial"


async def test_no_cache_asks_ollama_again(foreman: Foreman, stub: Stub, http: aiohttp.ClientSession) -> None:
    """Cache-Control: no-cache computes the vectors afresh."""
    await post(http, foreman.url + "/api/embed", {"model": MODEL, "input": "x"})
    calls = len(embed_calls(stub))
    await post(
        http, foreman.url + "/api/embed", {"model": MODEL, "input": "x"}, {"Cache-Control": "no-cache"}
    )
    assert len(embed_calls(stub)) == calls + 1
    assert foreman.jobs()[-1]["cache"] == "no-cache"


async def test_embed_cache_0_turns_the_cache_off(
    stub_server: StubServer, make_foreman: MakeForeman, http: aiohttp.ClientSession
) -> None:
    """FOREMAN_EMBED_CACHE=0: every request reaches Ollama, and /status says there is no cache."""
    foreman = await make_foreman(stub_server.url, embed_cache=0)
    for _ in range(2):
        await post(http, foreman.url + "/api/embed", {"model": MODEL, "input": "x"})
    assert embed_calls(stub_server.stub) == [["x"], ["x"]]
    async with http.get(foreman.url + "/status") as response:
        assert (await response.json())["embed_cache"] is None


async def test_a_pull_through_foreman_means_no_old_vector_is_served(
    foreman: Foreman, stub: Stub, http: aiohttp.ClientSession
) -> None:
    """After an /api/pull passes through foreman, the model's new digest gives new vectors, never the cached ones."""
    old = (await post(http, foreman.url + "/api/embed", {"model": MODEL, "input": "x"})).json()["embeddings"]
    digest = stub.find(MODEL).digest  # type: ignore[union-attr]
    pulled = await post(http, foreman.url + "/api/pull", {"model": MODEL, "stream": False})
    assert pulled.status == 200 and stub.find(MODEL).digest != digest  # type: ignore[union-attr]
    new = (await post(http, foreman.url + "/api/embed", {"model": MODEL, "input": "x"})).json()["embeddings"]
    assert new == [pytest.approx(vector(stub, "x"))] and new != old
    # The old digest's vectors are gone from the database, not only unused.
    await eventually(
        lambda: _cached_digests(foreman) == {stub.find(MODEL).digest}, what="the old vectors to go"
    )  # type: ignore[union-attr]


async def test_a_model_changed_behind_foreman_is_seen_on_the_next_refresh(
    stub_server: StubServer, make_foreman: MakeForeman, http: aiohttp.ClientSession
) -> None:
    """A digest changed directly in Ollama is read within FOREMAN_CACHE_REFRESH; then the new vectors are served."""
    foreman = await make_foreman(stub_server.url, cache_refresh=0.05)
    stub = stub_server.stub
    old = (await post(http, foreman.url + "/api/embed", {"model": MODEL, "input": "x"})).json()["embeddings"]
    tags = foreman.app[MODEL_TAGS]
    epoch = tags.epoch
    stub.install(StubModel(CANONICAL, kind="embedding"), digest="f" * 64)
    await eventually(lambda: tags.epoch > epoch, what="the refresh to see the new digest")
    new = (await post(http, foreman.url + "/api/embed", {"model": MODEL, "input": "x"})).json()["embeddings"]
    assert new == [pytest.approx(vector(stub, "x"))] and new != old


async def test_the_cache_survives_a_restart(
    stub_server: StubServer, make_foreman: MakeForeman, http: aiohttp.ClientSession
) -> None:
    """Vectors live in the jobs' database: after a restart, the same input costs no Ollama call."""
    first = await make_foreman(stub_server.url)
    before = await post(http, first.url + "/api/embed", {"model": MODEL, "input": "kept"})
    await first.close()
    second = await make_foreman(stub_server.url)
    after = await post(http, second.url + "/api/embed", {"model": MODEL, "input": "kept"})
    assert after.json()["embeddings"] == before.json()["embeddings"]
    assert embed_calls(stub_server.stub) == [["kept"]]


async def test_status_and_metrics_show_hits_misses_and_bytes(
    foreman: Foreman, http: aiohttp.ClientSession
) -> None:
    """/status and /metrics count the cache's hits and misses and show what it holds."""
    for inputs in (["a", "b"], ["a"], ["a", "c"]):
        await post(http, foreman.url + "/api/embed", {"model": MODEL, "input": inputs})
    async with http.get(foreman.url + "/status") as response:
        cache = (await response.json())["embed_cache"]
    assert (cache["hits"], cache["misses"], cache["entries"]) == (2, 3, 3)
    assert 0 < cache["bytes"] <= cache["limit_bytes"]
    async with http.get(foreman.url + "/metrics") as response:
        text = await response.text()
    assert 'foreman_embed_cache_lookups_total{result="hit"} 2.0' in text
    assert 'foreman_embed_cache_lookups_total{result="miss"} 3.0' in text
    assert f"foreman_embed_cache_bytes {float(cache['bytes'])}" in text


def _cached_digests(foreman: Foreman) -> set[str]:
    import sqlite3

    foreman.jobs()  # let the store's thread finish what it was handed
    db = sqlite3.connect(foreman.config.db_path)
    try:
        return {digest for (digest,) in db.execute("SELECT DISTINCT digest FROM embed_cache")}
    finally:
        db.close()


# ----------------------------------------------------------- the store's part


def test_the_cache_keeps_the_recently_used_within_its_bound(tmp_path: Path) -> None:
    """Least recently used out: a vector read recently stays when the bound is reached."""
    store = QueueFile(tmp_path / "q.db")
    vector = b"[" + b",".join(b"0.125" for _ in range(100)) + b"]"
    entries = [CacheEntry(bytes([i]) * 32, "d", vector, 1) for i in range(4)]
    size = len(vector) + 120
    store.cache_put(entries[:3], limit=3 * size)
    assert store.cache_get([entries[0].key]).keys() == {entries[0].key}  # 0 is now the most recent
    evicted = store.cache_put([entries[3]], limit=3 * size)
    assert evicted == 1
    assert set(store.cache_get([e.key for e in entries])) == {entries[0].key, entries[2].key, entries[3].key}
    assert store.cache_stats().entries == 3 and store.cache_stats().bytes == 3 * size
    assert store.cache_invalidate(["d"]) == 3 and store.cache_stats().bytes == 0
    store.close()


def test_the_cache_counts_survive_reopening(tmp_path: Path) -> None:
    """Entries and bytes are counted again from the table at start."""
    store = QueueFile(tmp_path / "q.db")
    store.cache_put([CacheEntry(b"k" * 32, "d", b"[1.0]", 2)], limit=10_000)
    store.close()
    store = QueueFile(tmp_path / "q.db")
    assert store.cache_stats().entries == 1
    assert store.cache_get([b"k" * 32])[b"k" * 32].tokens == 2
    store.close()


# -------------------------------------------------------------- pure pieces


def test_token_shares_add_up_to_the_calls_count() -> None:
    """A call's prompt_eval_count is split by input length, in whole numbers that add up."""
    assert share(10, [1, 1, 1]) == [4, 3, 3]
    assert share(7, [100, 1]) == [7, 0]
    assert sum(share(1001, [3, 5, 7, 11])) == 1001
    assert share(0, [1, 2]) == [0, 0]


def test_what_may_share_a_call() -> None:
    """Equal parameters share; keep_alive does not matter; loads and empty strings never share."""
    a = parse_embed("/api/embed", b'{"model":"m","input":"x","keep_alive":"1m"}')
    b = parse_embed("/v1/embeddings", b'{"model":"m","input":["y"]}')
    c = parse_embed("/api/embed", b'{"model":"m","input":"x","dimensions":4}')
    assert a is not None and b is not None and c is not None
    assert a.params == b.params != c.params
    for body in (b'{"model":"m","input":[]}', b'{"model":"m"}', b'{"model":"m","input":["a",""]}'):
        assert parse_embed("/api/embed", body) is None
    assert parse_embed("/api/embeddings", b'{"model":"m","prompt":"x"}') is None


def test_a_native_reply_leaves_zero_counts_out_as_ollama_does() -> None:
    """omitempty: a reply from the cache has no load_duration."""
    request = parse_embed("/api/embed", b'{"model":"m","input":"x"}')
    assert request is not None
    reply = json.loads(job_reply(request, [b"[0.5,0.25]"], 1, 7, 0))
    assert reply == {"model": "m", "embeddings": [[0.5, 0.25]], "total_duration": 7, "prompt_eval_count": 1}


async def test_an_alias_embed_job_reads_the_cache_once_its_model_is_picked(
    stub_server: StubServer, make_foreman: MakeForeman, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """An alias names no model at intake; once the worker picks one, the cache of that model answers it."""
    routes = tmp_path / "routes.toml"
    routes.write_text('[alias.emb]\nmodels = ["nomic-embed-text"]\n')
    foreman = await make_foreman(stub_server.url, routes=routes)
    stub = stub_server.stub
    direct = await post(http, foreman.url + "/api/embed", {"model": MODEL, "input": "x"})
    via_alias = await post(http, foreman.url + "/api/embed", {"model": "emb", "input": "x"})
    assert via_alias.status == 200
    assert via_alias.json()["embeddings"] == direct.json()["embeddings"]
    assert embed_calls(stub) == [["x"]]
    assert foreman.jobs()[-1]["cache"] == "hit" and foreman.jobs()[-1]["served_model"] == CANONICAL


async def test_an_ollama_that_does_not_answer_its_model_list_holds_up_no_request(
    aiohttp_server: Any, make_foreman: MakeForeman, http: aiohttp.ClientSession
) -> None:
    """Without digests the cache stands aside: one short read of /api/tags, then jobs queue without waiting for it."""
    tag_reads = 0
    never = asyncio.Event()

    async def tags(request: web.Request) -> web.Response:
        nonlocal tag_reads
        tag_reads += 1
        await never.wait()
        raise AssertionError("unreachable")

    async def ps(request: web.Request) -> web.Response:
        return web.json_response({"models": []})

    app = web.Application()
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", ps)
    server = await aiohttp_server(app)
    foreman = await make_foreman(str(server.make_url("")).rstrip("/"))
    for text in ("a", "b", "c"):
        accepted = await post(http, foreman.url + "/api/embed", {"model": MODEL, "input": text}, ASYNC)
        assert accepted.status == 202 and accepted.json()["state"] == "queued"
    assert tag_reads == 1
    never.set()
