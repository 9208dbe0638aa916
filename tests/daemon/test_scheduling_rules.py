"""The scheduling rules in the daemon: foreman in front of stub_ollama on loopback."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
from structlog.testing import capture_logs

from foreman.api.keys import WORKER
from foreman.job import Priority
from stub_ollama import StubModel
from tests.support.helpers import FakeClock, MakeForeman, MakeStub, chat_body, eventually, hold_worker, submit


def swaps(logs: list[dict[str, object]]) -> list[tuple[object, object]]:
    return [(e["to_model"], e["reason"]) for e in logs if e["event"] == "model.swap"]


async def test_an_overdue_job_takes_the_worker_from_the_hot_model_and_the_log_says_max_wait(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """Past FOREMAN_MAX_WAIT the older mistral job runs before llama3's queue, logged reason=max_wait."""
    server = await make_stub()
    clock = FakeClock()
    foreman = await make_foreman(server.url, clock=clock, max_wait=60)
    with capture_logs() as logs:
        first = await hold_worker(http, foreman, server.stub, "llama3")
        waiting = [await submit(http, foreman, chat_body("mistral", "old"))]
        clock.now += 30
        waiting += [await submit(http, foreman, chat_body("llama3", f"hot {i}")) for i in range(2)]
        clock.now += 31  # mistral has waited 61 s, llama3's jobs 31 s
        server.stub.faults.release_hung()
        await asyncio.gather(first, *waiting)
    served = [r.prompt for r in server.stub.inference_requests()]
    assert served == ["first", "old", "hot 0", "hot 1"]
    assert swaps(logs) == [
        ("llama3:latest", "cold"),
        ("mistral:latest", "max_wait"),
        ("llama3:latest", "drained"),
    ]
    swap = next(e for e in logs if e["event"] == "model.swap" and e["reason"] == "max_wait")
    assert swap["oldest_wait_s"] == 61 and swap["from_models"] == ["llama3:latest"]


async def test_an_interactive_request_cuts_into_a_max_wait_drain_of_batch_work(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """At the next job boundary the interactive job runs; then the batch drain resumes where it was."""
    server = await make_stub()
    clock = FakeClock()
    foreman = await make_foreman(server.url, clock=clock, max_wait=60)
    batch = {"X-Foreman-Priority": "batch"}
    with capture_logs() as logs:
        first = await hold_worker(http, foreman, server.stub, "llama3")
        tasks = [await submit(http, foreman, chat_body("mistral", f"m{i}"), headers=batch) for i in range(3)]
        clock.now += 61  # mistral's batch jobs are overdue: a max_wait drain comes next
        server.stub.faults.hang_next(1)  # hold the drain's first job
        server.stub.faults.release_hung()
        assert (await first).status == 200
        await server.stub.wait_for(lambda s: s.faults.hung == 1)
        tasks.append(await submit(http, foreman, chat_body("qwen2", "chat")))
        server.stub.faults.release_hung()
        await asyncio.gather(*tasks)
    served = [r.prompt for r in server.stub.inference_requests()]
    assert served == ["first", "m0", "chat", "m1", "m2"]
    assert swaps(logs) == [
        ("llama3:latest", "cold"),
        ("mistral:latest", "max_wait"),
        ("qwen2:latest", "priority"),
        ("mistral:latest", "max_wait"),
    ]


async def test_interactive_requests_overtake_batch_work_at_the_cost_of_a_swap(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """X-Foreman-Priority: batch jobs for the loaded model wait while an interactive job swaps."""
    server = await make_stub()
    foreman = await make_foreman(server.url)
    batch = {"X-Foreman-Priority": "batch"}
    with capture_logs() as logs:
        first = await hold_worker(http, foreman, server.stub, "llama3")
        tasks = [await submit(http, foreman, chat_body("llama3", f"b{i}"), headers=batch) for i in range(2)]
        tasks.append(await submit(http, foreman, chat_body("mistral", "chat")))
        server.stub.faults.release_hung()
        await asyncio.gather(first, *tasks)
    assert [r.prompt for r in server.stub.inference_requests()] == ["first", "chat", "b0", "b1"]
    assert swaps(logs)[1] == ("mistral:latest", "priority")
    assert [j["priority"] for j in foreman.jobs()] == ["interactive", "batch", "batch", "interactive"]


async def test_a_bad_priority_header_is_refused_before_queueing(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """An unknown X-Foreman-Priority is a 400 that names the header, and no job is written."""
    server = await make_stub()
    foreman = await make_foreman(server.url)
    async with http.post(
        foreman.url + "/api/chat", json=chat_body("llama3"), headers={"X-Foreman-Priority": "urgent"}
    ) as response:
        assert response.status == 400
        assert "X-Foreman-Priority" in (await response.json())["error"]
    assert foreman.jobs() == []


async def test_sync_priority_setting_makes_plain_requests_batch(
    make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """FOREMAN_SYNC_PRIORITY=batch: a request without the header becomes a batch job."""
    server = await make_stub()
    foreman = await make_foreman(server.url, sync_priority=Priority.BATCH)
    response = await foreman.client.post("/api/chat", json=chat_body("llama3"))
    assert response.status == 200
    assert [j["priority"] for j in foreman.jobs()] == ["batch"]


async def test_parallel_runs_several_jobs_of_the_loaded_model_but_never_two_models(
    make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """FOREMAN_PARALLEL=3 fills Ollama's slots with one model's jobs; the next model waits for them."""
    server = await make_stub(num_parallel=3, token_delay=0.02, tokens=5)
    foreman = await make_foreman(server.url, parallel=3)
    order = ["llama3"] * 4 + ["mistral"] * 3
    answers = await asyncio.gather(
        *(foreman.client.post("/api/chat", json=chat_body(m, str(i))) for i, m in enumerate(order))
    )
    assert [a.status for a in answers] == [200] * 7
    stub = server.stub
    assert stub.max_generating == 3
    runs = sorted(stub.inference_requests(), key=lambda r: r.arrived_at)
    for earlier in runs:
        for later in runs:
            if earlier.model != later.model and earlier.arrived_at < later.arrived_at:
                assert earlier.finished_at is not None and earlier.finished_at <= later.arrived_at
    assert stub.loads == ["llama3:latest", "mistral:latest"]


async def test_a_load_makes_room_by_evicting_the_resident_model_with_least_waiting_work(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """Two slots full, both with work: loading a third evicts the less busy, not the least recently used."""
    # Equal token times: the victim is chosen by waiting jobs x learned run time, learned
    # here from one job each, which a busy machine can stretch. Six jobs against one keep
    # the choice clear of that noise (five if one llama3 job slips in as Ollama comes back).
    server = await make_stub(capacity=2, token_delay=0.005)
    stub = server.stub
    foreman = await make_foreman(server.url, backoff_initial=0.005, backoff_max=0.01)
    for model in ("llama3", "mistral"):  # mistral is the most recently used
        assert (await foreman.client.post("/api/chat", json=chat_body(model))).status == 200
    batch = {"X-Foreman-Priority": "batch"}
    with capture_logs() as logs:
        # Queue everything while Ollama is away (keeping its models), so the worker sees it all at once.
        await server.stop_listening(reset_state=False)
        tasks = [
            await submit(http, foreman, chat_body(m, f"{m} {i}"), headers=batch)
            for i, m in enumerate(["llama3"] * 6 + ["mistral"])
        ]
        tasks.append(await submit(http, foreman, chat_body("qwen2", "chat")))
        await server.resume_listening()
        await asyncio.gather(*tasks)
    swap = next(e for e in logs if e["event"] == "model.swap")
    assert (swap["to_model"], swap["reason"], swap["evict"]) == ("qwen2:latest", "priority", "mistral:latest")
    pinned = [(e["model"], e["reason"]) for e in logs if e["event"] == "model.pinned"]
    assert pinned == [("llama3:latest", "make_room")]
    assert stub.evictions[0] == "mistral:latest"


async def test_learned_costs_and_state_are_exposed_by_model_stats(
    make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """After a swap and a job, model_stats() has the load count, mean load time and mean run time."""
    server = await make_stub(load_delay=0.05)
    foreman = await make_foreman(server.url)
    await foreman.client.post("/api/chat", json=chat_body("llama3"))
    worker = foreman.app[WORKER]
    [stats] = worker.model_stats()
    assert stats.model_key == "llama3:latest" and stats.loads == 1 and stats.runs == 1
    assert stats.mean_load_s is not None and stats.mean_load_s >= 0.05
    assert stats.mean_run_s is not None and stats.serving and not stats.draining


async def test_the_next_model_is_read_into_the_page_cache_while_the_loaded_one_drains(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman, tmp_path: Path
) -> None:
    """The blob /api/show names is read through (posix_fadvise + read) before its model loads."""
    blob = tmp_path / "sha256-mistral"
    blob.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    models = (
        StubModel("llama3:latest"),
        StubModel("mistral:latest", blob_path=str(blob)),
        StubModel("qwen2:latest"),
    )
    server = await make_stub(models=models)
    foreman = await make_foreman(server.url)
    with capture_logs() as logs:
        first = await hold_worker(http, foreman, server.stub, "llama3")
        tasks = [await submit(http, foreman, chat_body(m, m)) for m in ("llama3", "mistral", "qwen2")]
        await eventually(lambda: any(e["event"] == "model.warm" for e in logs), what="the warm-up")
        server.stub.faults.release_hung()
        await asyncio.gather(first, *tasks)
    warm = next(e for e in logs if e["event"] == "model.warm")
    assert warm["model"] == "mistral:latest" and warm["path"] == str(blob)
    assert warm["bytes"] == blob.stat().st_size and warm["complete"]
    skipped = [e for e in logs if e["event"] == "model.warm_skipped"]
    assert [(e["model"], e["reason"]) for e in skipped] == [("qwen2:latest", "blob not readable by foreman")]


async def test_warming_off_reads_nothing(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """FOREMAN_WARM=off never asks /api/show and logs no warm-up."""
    server = await make_stub()
    foreman = await make_foreman(server.url, warm="off")
    with capture_logs() as logs:
        first = await hold_worker(http, foreman, server.stub, "llama3")
        tasks = [await submit(http, foreman, chat_body(m, m)) for m in ("llama3", "mistral")]
        server.stub.faults.release_hung()
        await asyncio.gather(first, *tasks)
    assert not [e for e in logs if e["event"].startswith("model.warm")]


async def test_an_interactive_job_does_not_wait_for_a_batch_models_load(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """A slow load begun for batch work is abandoned (Ollama aborts it) when an interactive job arrives."""
    models = (StubModel("llama3:latest"), StubModel("mixtral:latest", load_delay=30))
    server = await make_stub(models=models)
    stub = server.stub
    foreman = await make_foreman(server.url)
    with capture_logs() as logs:
        bulk = await submit(
            http, foreman, chat_body("mixtral", "bulk"), headers={"X-Foreman-Priority": "batch"}
        )
        await stub.wait_for(lambda s: s.loading() == ["mixtral:latest"])
        answer = await foreman.client.post("/api/chat", json=chat_body("llama3", "chat"))
        assert answer.status == 200
        assert not bulk.done()
        assert [j["state"] for j in foreman.jobs()][1] == "done"
    abandoned = [e for e in logs if e["event"] == "model.load_abandoned"]
    assert [(e["model"], e["reason"]) for e in abandoned] == [("mixtral:latest", "priority")]
    assert stub.evictions[0] == "mixtral:latest"  # the stub aborted the load when foreman hung up
    assert [j["attempt"] for j in foreman.jobs()] == [0, 0]
    bulk.cancel()
