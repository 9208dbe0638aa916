"""A model being loaded is the one that runs next: positions, /status's drain order and the page's queue say so."""

from __future__ import annotations

from typing import Any

from foreman.client.layout import format_status
from stub_ollama import StubModel
from tests.support.helpers import ASYNC, Foreman, MakeForeman, MakeStub, chat_body

INTERACTIVE = {**ASYNC, "X-Foreman-Priority": "interactive"}  # so no load is given up for another


async def submit(foreman: Foreman, model: str) -> dict[str, Any]:
    answer = await foreman.client.post("/api/chat", json=chat_body(model), headers=INTERACTIVE)
    assert answer.status == 202
    accepted: dict[str, Any] = await answer.json()
    return accepted


async def test_jobs_for_the_loading_model_come_first(make_stub: MakeStub, make_foreman: MakeForeman) -> None:
    """alpha loaded, delta loading: delta's next job is position 0 and alpha's 1, as delta runs first."""
    server = await make_stub(models=(StubModel("alpha:latest"), StubModel("delta:latest", load_delay=3)))
    stub = server.stub
    foreman = await make_foreman(server.url)
    assert (await foreman.client.post("/api/chat", json=chat_body("alpha"))).status == 200
    loading = await submit(foreman, "delta")
    await stub.wait_for(lambda s: s.loading() == ["delta:latest"])
    alpha = await submit(foreman, "alpha")
    delta = await submit(foreman, "delta")
    assert delta["position"] == 0  # ahead of alpha's, queued before it
    views = [await (await foreman.client.get(f"/jobs/{job['id']}")).json() for job in (loading, delta, alpha)]
    assert [(view["state"], view["position"]) for view in views] == [
        ("loading", None),
        ("queued", 0),
        ("queued", 1),
    ]
    status = await (await foreman.client.get("/status")).json()
    assert [entry["model"] for entry in status["queue"]] == ["delta:latest", "alpha:latest"]
    assert "delta:latest" in format_status(status, 0).split("QUEUE (drain order)")[1].splitlines()[1]
    await foreman.wait_states(lambda states: states == ["done"] * 4)
    served = [r.model for r in stub.inference_requests()]
    assert served[-3:] == ["delta", "delta", "alpha"]
