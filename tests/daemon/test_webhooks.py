"""Signed webhooks: OpenAI's event shape, the Standard Webhooks signature, a durable outbox with retries."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from foreman.config import SETTINGS, Config, config_from
from stub_ollama import StubServer
from tests.clients.test_openai_batches import CHAT, chat_line, finished, until, upload
from tests.support.helpers import ASYNC, FakeClock, MakeForeman, chat_body, eventually

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


@dataclass
class Receiver:
    """An HTTP endpoint that records what it gets and answers with `statuses` in turn (then 200)."""

    server: TestServer
    statuses: list[int] = field(default_factory=list)
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.server.make_url("/hook"))

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), await request.read()))
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    app = web.Application()
    server = TestServer(app)
    hook = Receiver(server)
    app.router.add_post("/hook", hook.handle)
    await server.start_server()
    yield hook
    await server.close()


def verified(received: tuple[dict[str, str], bytes]) -> object:
    """The event as the openai SDK's `webhooks.unwrap` reads it, having checked its signature."""
    headers, body = received
    return openai.OpenAI(api_key="x", webhook_secret=SECRET).webhooks.unwrap(body, headers)


async def test_a_batch_event_verified_by_the_sdk_after_two_500s(
    make_foreman: MakeForeman, stub_server: StubServer, receiver: Receiver
) -> None:
    """The receiver answers 500 twice: the third attempt, same webhook-id, is a batch.completed the SDK accepts."""
    receiver.statuses = [500, 500]
    foreman = await make_foreman(
        stub_server.url, webhook_url=(("hook", receiver.url),), webhook_secret=SECRET, webhook_backoff=0
    )
    client = openai.AsyncOpenAI(base_url=foreman.url + "/v1", api_key="x", max_retries=0)
    with capture_logs() as logs:
        batch = await client.batches.create(
            input_file_id=await upload(client, [chat_line("a", "llama3", "x")]),
            endpoint=CHAT,
            completion_window="24h",
        )
        assert (await finished(client, batch.id)).status == "completed"
        await eventually(lambda: len(receiver.received) == 3, within=15, what="three attempts")
        # The attempt is logged once its outcome is recorded, a moment after the receiver answered.
        await eventually(
            lambda: any(e["event"] == "webhook.delivered" for e in logs), what="the delivery's log line"
        )
    await client.close()
    ids = {headers["webhook-id"] for headers, _ in receiver.received}
    assert len(ids) == 1
    event = verified(receiver.received[-1])
    assert isinstance(event, openai.types.webhooks.BatchCompletedWebhookEvent)
    assert event.data.id == batch.id and event.object == "event" and event.id == ids.pop()
    with pytest.raises(openai.InvalidWebhookSignatureError):
        other = "whsec_" + base64.b64encode(b"another key, 32 bytes long......").decode()
        openai.OpenAI(api_key="x").webhooks.verify_signature(
            receiver.received[-1][1], receiver.received[-1][0], secret=other
        )
    attempts = [(e["event"], e.get("status")) for e in logs if e["event"].startswith("webhook.")]
    assert attempts == [("webhook.retry", 500), ("webhook.retry", 500), ("webhook.delivered", 200)]

    async def settled() -> bool:
        status = await (await foreman.client.get("/status")).json()
        return bool(status["webhooks"] == {"endpoints": ["hook"], "pending": 0, "failed": 0})

    await until(settled, 5, "/status to count no pending delivery")


async def test_a_pending_delivery_keeps_its_id_across_a_restart(
    make_foreman: MakeForeman, stub_server: StubServer, receiver: Receiver
) -> None:
    """A delivery still failing when foreman stops is retried by the next foreman, under the same webhook-id."""
    receiver.statuses = [503] * 1000
    settings = {"webhook_url": (("hook", receiver.url),), "webhook_secret": SECRET, "webhook_backoff": 0}
    first = await make_foreman(stub_server.url, **settings)
    client = openai.AsyncOpenAI(base_url=first.url + "/v1", api_key="x", max_retries=0)
    batch = await client.batches.create(
        input_file_id=await upload(client, [chat_line("a", "llama3", "x")]),
        endpoint=CHAT,
        completion_window="24h",
    )
    await finished(client, batch.id)
    await eventually(lambda: len(receiver.received) >= 1, within=15, what="a first attempt")

    async def pending() -> bool:
        return bool((await (await first.client.get("/status")).json())["webhooks"]["pending"] == 1)

    await until(pending, 5, "/status to count the pending delivery")
    await client.close()
    await first.close()
    first_id = receiver.received[0][0]["webhook-id"]
    receiver.statuses = []
    tried = len(receiver.received)

    second = await make_foreman(stub_server.url, **settings)
    await eventually(
        lambda: len(receiver.received) == tried + 1, within=15, what="the delivery after the restart"
    )
    assert {headers["webhook-id"] for headers, _ in receiver.received} == {first_id}
    assert verified(receiver.received[-1]).data.id == batch.id  # type: ignore[attr-defined]
    metrics = await (await second.client.get("/metrics")).text()
    assert 'foreman_webhook_deliveries{state="failed"} 0.0' in metrics


async def test_an_async_job_names_an_endpoint_for_its_event(
    make_foreman: MakeForeman, stub_server: StubServer, receiver: Receiver
) -> None:
    """`X-Foreman-Webhook: NAME` on an async job sends NAME a job.completed event; an unknown name is a 400."""
    foreman = await make_foreman(
        stub_server.url,
        webhook_url=(("hook", receiver.url), ("other", receiver.url + "/other")),
        webhook_secret=SECRET,
        webhook_backoff=0,
    )
    unknown = await foreman.client.post(
        "/api/chat", json=chat_body("llama3"), headers={**ASYNC, "X-Foreman-Webhook": "http://evil/"}
    )
    assert unknown.status == 400 and "not one of the configured endpoints" in (await unknown.json())["error"]
    sync = await foreman.client.post(
        "/api/chat", json=chat_body("llama3"), headers={"X-Foreman-Webhook": "hook"}
    )
    assert sync.status == 400 and "Prefer: respond-async" in (await sync.json())["error"]
    accepted = await foreman.client.post(
        "/api/chat", json=chat_body("llama3"), headers={**ASYNC, "X-Foreman-Webhook": "hook"}
    )
    assert accepted.status == 202
    job_id = (await accepted.json())["id"]
    await eventually(lambda: len(receiver.received) == 1, within=15, what="the job's event")
    headers, body = receiver.received[0]
    openai.OpenAI(api_key="x").webhooks.verify_signature(body, headers, secret=SECRET)
    event = json.loads(body)
    assert (event["type"], event["object"], event["data"]) == ("job.completed", "event", {"id": job_id})
    assert len(foreman.jobs()) == 1  # the refused requests made no job


async def test_a_delivery_is_given_up_after_a_day(
    make_foreman: MakeForeman, stub_server: StubServer, receiver: Receiver
) -> None:
    """An endpoint that keeps failing gets retries for a day; then the delivery counts as failed."""
    receiver.statuses = [500] * 1000
    clock = FakeClock(1_800_000_000.0)
    foreman = await make_foreman(
        stub_server.url,
        clock=clock,
        webhook_url=(("hook", receiver.url),),
        webhook_secret=SECRET,
        webhook_backoff=0,
    )
    client = openai.AsyncOpenAI(base_url=foreman.url + "/v1", api_key="x", max_retries=0)
    batch = await client.batches.create(
        input_file_id=await upload(client, [chat_line("a", "llama3", "x")]),
        endpoint=CHAT,
        completion_window="24h",
    )
    await finished(client, batch.id)
    await client.close()
    await eventually(lambda: len(receiver.received) >= 1, within=15, what="a first attempt")
    with capture_logs() as logs:
        clock.now += 24 * 3600
        await eventually(
            lambda: any(e["event"] == "webhook.gave_up" for e in logs), within=15, what="giving up"
        )

    async def counts() -> dict[str, int]:
        return dict((await (await foreman.client.get("/status")).json())["webhooks"])

    async def failed_once() -> bool:
        return (await counts())["failed"] == 1

    await until(failed_once, 15, "/status to count the failed delivery")
    assert await counts() == {"endpoints": ["hook"], "pending": 0, "failed": 1}
    metrics = await (await foreman.client.get("/metrics")).text()
    assert 'foreman_webhook_deliveries{state="failed"} 1.0' in metrics


def test_a_webhook_url_needs_a_whsec_secret() -> None:
    """FOREMAN_WEBHOOK_URL without a secret, or a secret that is not whsec_ and base64, stops foreman with one line."""
    raw = {s.name: s.default_text({}, False) for s in SETTINGS}
    raw["db_path"] = "/tmp/x.db"
    with pytest.raises(ValueError, match="needs FOREMAN_WEBHOOK_SECRET"):
        config_from({**raw, "webhook_url": "http://127.0.0.1:9/hook"})
    with pytest.raises(ValueError, match="whsec_"):
        config_from({**raw, "webhook_url": "http://127.0.0.1:9/hook", "webhook_secret": "plain"})
    with pytest.raises(ValueError, match="http"):
        config_from({**raw, "webhook_url": "name=ftp://x", "webhook_secret": SECRET})
    config = config_from({**raw, "webhook_url": "a=http://h/1, http://h/2", "webhook_secret": SECRET})
    assert isinstance(config, Config) and config.webhook_url == (
        ("a", "http://h/1"),
        ("http://h/2", "http://h/2"),
    )
