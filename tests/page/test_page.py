"""The live page at /ui and the queue's event stream, over HTTP and in a real headless Chromium."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, Route, expect

from foreman.job import JobState, Priority
from foreman.queue import page_feed as feed
from foreman.queue.page_feed import PageFeed
from foreman.ui import CONTENT_SECURITY_POLICY
from stub_ollama import StubModel
from tests.support.browser import CHROMIUM, headless_chromium
from tests.support.helpers import Foreman, MakeForeman, MakeStub, eventually

STATIC = Path(__file__).resolve().parents[2] / "foreman" / "ui" / "static"
MODELS = ("llama3:latest", "mistral:latest", "qwen2:latest")
WAIT_MS = 15_000  # the deadline for anything the page shows


async def submit_async(http: aiohttp.ClientSession, foreman: Foreman, model: str, **headers: str) -> str:
    """Queue an async chat job and return its id."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(
        foreman.url + "/api/chat", json=body, headers={"Prefer": "respond-async", **headers}
    ) as response:
        assert response.status == 202, await response.text()
        job_id: str = (await response.json())["id"]
        return job_id


async def job_state(http: aiohttp.ClientSession, foreman: Foreman, job_id: str, **headers: str) -> str:
    async with http.get(f"{foreman.url}/jobs/{job_id}", headers=headers) as response:
        state: str = (await response.json())["state"]
        return state


# ---------------------------------------------------------------------- over HTTP


class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.script_text += data


async def test_the_page_is_small_static_and_allows_no_inline_script(foreman: Foreman) -> None:
    """/ui is the package's HTML under a strict CSP: scripts and styles only from files, well under 200 KB."""
    response = await foreman.client.get("/ui")
    assert response.status == 200
    assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self';" in CONTENT_SECURITY_POLICY and "unsafe" not in CONTENT_SECURITY_POLICY
    markup = _Markup()
    markup.feed(await response.text())
    scripts = [attrs for tag, attrs in markup.tags if tag == "script"]
    assert scripts and all((attrs.get("src") or "").startswith("/ui/") for attrs in scripts)
    assert markup.script_text.strip() == ""
    assert not [tag for tag, _ in markup.tags if tag == "style"]
    inline = [
        (tag, name)
        for tag, attrs in markup.tags
        for name in attrs
        if name == "style" or name.startswith("on")
    ]
    assert inline == []
    for path, kind in [("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")]:
        asset = await foreman.client.get(path)
        assert asset.status == 200 and asset.content_type == kind
    assert sum(f.stat().st_size for f in STATIC.iterdir()) < 200_000
    assert (await foreman.client.get("/ui/nothing.js")).status == 404


async def test_root_is_still_ollamas_answer(foreman: Foreman) -> None:
    """GET / stays Ollama's own 'Ollama is running', which clients probe."""
    response = await foreman.client.get("/")
    assert response.status == 200 and await response.text() == "Ollama is running"


async def test_the_page_and_its_stream_keep_the_apis_host_origin_and_token_rules(
    make_foreman: MakeForeman, stub_server: Any
) -> None:
    """A foreign Host or Origin gets 403 on /ui and /events; the token guards /events but not the files."""
    foreman = await make_foreman(stub_server.url, token="s3cret")
    for path in ("/ui", "/events"):
        assert (await foreman.client.get(path, headers={"Host": "evil.example"})).status == 403
        assert (await foreman.client.get(path, headers={"Origin": "https://evil.example"})).status == 403
    assert (await foreman.client.get("/ui")).status == 200
    assert (await foreman.client.get("/ui/app.js")).status == 200
    refused = await foreman.client.get("/events")
    assert refused.status == 401 and "error" in await refused.json()
    assert (await foreman.client.get("/status")).status == 401


async def _sse(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    name, data = "message", ""
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data += line[6:]
        elif not line and data:
            yield name, json.loads(data)
            name, data = "message", ""


async def test_events_stream_the_queues_transitions_and_replay_the_last_minutes(
    foreman: Foreman, http: aiohttp.ClientSession
) -> None:
    """/events says hello, then each arrival, load, start, swap and end; a late watcher gets them as history."""
    async with http.get(foreman.url + "/events") as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        events = _sse(response)
        name, hello = await anext(events)
        assert name == "hello" and hello["history"] == []
        job_id = await submit_async(http, foreman, "llama3")
        seen: list[tuple[str, str]] = []
        async for name, data in events:
            seen.append((name, data.get("state") or data["reason"]))
            if name == "job":
                assert data["id"] == job_id and data["model"] == "llama3:latest"
                assert data["priority"] == "batch"
            else:
                assert data["model"] == "llama3:latest" and data["from"] == []
            if data.get("state") == "done":
                break
    moves = [("job", "loading"), ("swap", "cold"), ("job", "working"), ("job", "done")]
    # The worker may claim the job before its handler hears the commit back: then no stale arrival.
    assert seen in ([("job", "queued"), *moves], moves)
    async with http.get(foreman.url + "/events") as late:
        _, hello = await anext(_sse(late))
    history = [
        (item["event"], item["data"].get("state") or item["data"]["reason"]) for item in hello["history"]
    ]
    assert history == moves  # arrivals draw nothing on the timeline, so they are not kept


async def test_status_says_which_model_foreman_pins_while_work_waits_for_it(
    make_stub: MakeStub, make_foreman: MakeForeman, http: aiohttp.ClientSession
) -> None:
    """/status marks a model pinned while jobs wait for it, and not once its last job released it."""
    # The load gives the second job time to arrive before the first one is sent.
    server = await make_stub(load_delay=0.5, token_delay=0.01, tokens=40)
    foreman = await make_foreman(server.url)
    first = await submit_async(http, foreman, "llama3")
    await submit_async(http, foreman, "llama3")

    async def status() -> dict[str, Any]:
        async with http.get(foreman.url + "/status") as response:
            answer: dict[str, Any] = await response.json()
            return answer

    def pinned(answer: dict[str, Any]) -> list[tuple[str, bool]]:
        return [(m["model_key"], m["pinned"]) for m in answer["models"]]

    # The job is marked working a moment before its request (which pins the model) is
    # sent: poll for the pin while the first job runs, its 40 tokens leave time for it.
    deadline = time.monotonic() + 5
    while ((now := await status())["running"] or {}).get("state") != "working" or not any(
        pin for _, pin in pinned(now)
    ):
        running = now["running"] or {"id": first}
        assert running["id"] == first, f"llama3 was not shown pinned while the first job ran: {now}"
        assert time.monotonic() < deadline, f"the first job never ran with its model pinned: {now}"
        await asyncio.sleep(0.005)
    assert now["running"]["id"] == first
    assert pinned(now) == [("llama3:latest", True)]
    await eventually(lambda: foreman.states() == ["done", "done"], what="both jobs to finish")
    assert [(m["model_key"], m["pinned"]) for m in (await status())["models"]] == [("llama3:latest", False)]


def test_a_watcher_that_falls_behind_is_cut_off_and_the_history_keeps_the_last_minutes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The feed never buffers without bound: a stuck watcher gets its end; history is bounded by age and count."""
    monkeypatch.setattr(feed, "BACKLOG_MAX", 5)
    hub = PageFeed(history_s=60, history_max=3)
    with hub.watch() as slow, hub.watch() as quick:
        for i in range(6):
            hub.job(f"j{i}", JobState.WORKING, 100.0 + i, model="llama3:latest", priority=Priority.BATCH)
            while not quick.empty():
                quick.get_nowait()
        hub.arrived("j9", "llama3:latest", Priority.BATCH, 106.0)
        hub.arrived("j5", "llama3:latest", Priority.BATCH, 106.0)  # stale: the worker has moved it
        assert [e.data["id"] for e in [quick.get_nowait() for _ in range(quick.qsize())] if e] == ["j9"]
        got = [slow.get_nowait() for _ in range(slow.qsize())]
        assert [e.data["id"] if e else None for e in got] == ["j0", "j1", "j2", "j3", None]
    assert [e.data["id"] for e in hub.history(now=106.0)] == ["j3", "j4", "j5"]  # arrivals are not kept
    assert [e.data["id"] for e in hub.history(now=164.5)] == ["j5"]


# ---------------------------------------------------------------------- in Chromium


@dataclass
class Console:
    """What the page said on its console, and the scripts that threw."""

    errors: list[str] = field(default_factory=list)

    def on_message(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)


OpenPage = Callable[..., Awaitable[tuple[Page, Console]]]


@pytest.fixture(scope="session")
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (.ci/run installs it)")
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with headless_chromium() as launched:
        yield launched


@pytest.fixture
def open_page(browser: Browser) -> OpenPage:
    """Open foreman's /ui in a fresh tab of `width` x `height`, recording console errors."""

    async def open_(foreman: Foreman, width: int = 1280, height: int = 800) -> tuple[Page, Console]:
        context = await browser.new_context(viewport={"width": width, "height": height})
        page = await context.new_page()
        console = Console()
        page.on("console", console.on_message)
        page.on("pageerror", lambda error: console.errors.append(f"uncaught: {error}"))
        await page.goto(foreman.url + "/ui")
        return page, console

    return open_


async def _live(page: Page) -> None:
    await expect(page.locator("#connection")).to_have_text("live", timeout=WAIT_MS)


async def test_a_batch_over_three_models_drains_model_by_model_on_the_page(
    make_stub: MakeStub, make_foreman: MakeForeman, http: aiohttp.ClientSession, open_page: OpenPage
) -> None:
    """With no console error, the page shows the queue by model, then a timeline that grows model by model."""
    models = (StubModel(MODELS[0], load_delay=3.0), StubModel(MODELS[1]), StubModel(MODELS[2]))
    server = await make_stub(models=models, load_delay=0.1, token_delay=0.005)
    foreman = await make_foreman(server.url)
    page, console = await open_page(foreman)
    await _live(page)
    runs = page.locator("#timeline rect.run")
    await expect(runs).to_have_count(0)
    for _ in range(3):
        for model in MODELS:
            await submit_async(http, foreman, model.split(":")[0])
    # While the first model loads, the others wait in the queue, each with its three batch jobs.
    for model in MODELS[1:]:
        row = page.locator(f'#queue tr[data-model="{model}"] td')
        await expect(row.nth(1)).to_have_text("3", timeout=WAIT_MS)
    await expect(runs).to_have_count(9, timeout=WAIT_MS)
    await expect(page.locator('#overview [data-stat="done"] dd')).to_have_text("9", timeout=WAIT_MS)
    # Read in one go: the timeline is redrawn every second, to a new scale.
    placed = await runs.evaluate_all(
        "bars => bars.map((b) => [Number(b.getAttribute('x')), b.dataset.model])"
    )
    served = [model for _, model in sorted(placed)]
    assert served == [MODELS[0]] * 3 + [MODELS[1]] * 3 + [MODELS[2]] * 3
    swaps = page.locator("#swaps li")
    await expect(swaps).to_have_count(3)
    assert [await swaps.nth(i).get_attribute("data-reason") for i in range(3)] == [
        "drained",
        "drained",
        "cold",
    ]
    await expect(page.locator("#queue tbody")).to_have_text("Nothing waits.")
    assert console.errors == []


async def test_cancel_buttons_cancel_a_queued_and_a_running_job(
    make_stub: MakeStub, make_foreman: MakeForeman, http: aiohttp.ClientSession, open_page: OpenPage
) -> None:
    """The page's cancel buttons drop a waiting job and abort the running one; its output showed live."""
    server = await make_stub(token_delay=0.05, tokens=2000)
    foreman = await make_foreman(server.url)
    running = await submit_async(http, foreman, "llama3")
    waiting = await submit_async(http, foreman, "mistral")
    page, console = await open_page(foreman)
    await _live(page)
    await expect(page.locator(f'#running [data-job="{running}"]')).to_be_visible(timeout=WAIT_MS)
    await expect(page.locator("#output")).not_to_be_empty(timeout=WAIT_MS)
    row = page.locator(f'#jobs tr[data-job="{waiting}"]')
    await row.get_by_role("button", name=f"Cancel job {waiting}").click()
    await expect(page.locator("#message")).to_have_text(f"Job {waiting} is cancelled.", timeout=WAIT_MS)
    assert await job_state(http, foreman, waiting) == "cancelled"
    await page.locator("#running").get_by_role("button", name=f"Cancel job {running}").click()
    await expect(page.locator("#message")).to_have_text(f"Job {running} is cancelled.", timeout=WAIT_MS)
    assert await job_state(http, foreman, running) == "cancelled"
    await expect(page.locator("#running")).to_have_text("Nothing runs.", timeout=WAIT_MS)
    await expect(page.locator(f'#jobs tr[data-job="{waiting}"]')).to_have_attribute(
        "data-state", "cancelled", timeout=WAIT_MS
    )
    assert console.errors == []


async def test_with_a_token_the_page_shows_nothing_until_the_token_is_entered(
    make_foreman: MakeForeman, stub_server: Any, http: aiohttp.ClientSession, open_page: OpenPage
) -> None:
    """Behind FOREMAN_TOKEN the page asks for it first, refuses a wrong one, and keeps it out of the URL."""
    foreman = await make_foreman(stub_server.url, token="s3cret")
    job_id = await submit_async(http, foreman, "llama3", Authorization="Bearer s3cret")
    page, console = await open_page(foreman)
    await expect(page.locator("#gate")).to_be_visible(timeout=WAIT_MS)
    await expect(page.locator("#live")).to_be_hidden()
    assert "llama3" not in await page.content() and job_id not in await page.content()
    await page.locator("#token").fill("wrong")
    await page.keyboard.press("Enter")
    await expect(page.locator("#token-error")).to_have_text("foreman refused that token.", timeout=WAIT_MS)
    await expect(page.locator("#live")).to_be_hidden()
    await page.locator("#token").fill("s3cret")
    await page.get_by_role("button", name="Show the queue").click()
    await _live(page)
    await expect(page.locator(f'#jobs tr[data-job="{job_id}"]')).to_be_visible(timeout=WAIT_MS)
    await expect(page.locator("#gate")).to_be_hidden()
    assert "s3cret" not in page.url and page.url == foreman.url + "/ui"
    assert await page.evaluate("sessionStorage.getItem('foreman.token')") == "s3cret"
    # The only errors are the browser's notes of the two refused requests.
    assert console.errors and all("401" in error for error in console.errors), console.errors


# Contrast of every visible text against the background it sits on (WCAG 2 formulas).
CONTRAST_PROBE = """() => {
  const rgb = (c) => (c.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => [r, g, b].map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; })
    .reduce((s, v, i) => s + v * [0.2126, 0.7152, 0.0722][i], 0);
  const background = (node) => {
    for (let n = node; n; n = n.parentElement) {
      const c = rgb(getComputedStyle(n).backgroundColor);
      if (c.length === 3 || c[3] > 0) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const low = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const text = walker.currentNode;
    const node = text.parentElement;
    if (!text.textContent.trim() || !node || !node.checkVisibility() || node.closest('svg')) continue;
    const style = getComputedStyle(node);
    const [a, b] = [lum(rgb(style.color).slice(0, 3)), lum(background(node))];
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    const large = parseFloat(style.fontSize) >= 24 || (parseFloat(style.fontSize) >= 18.66 && style.fontWeight >= 700);
    if (ratio < (large ? 3 : 4.5)) low.push(text.textContent.trim().slice(0, 30) + ' ' + ratio.toFixed(2));
  }
  return low;
}"""


async def test_the_page_works_by_keyboard_with_readable_contrast_on_a_desktop_and_a_phone(
    make_stub: MakeStub, make_foreman: MakeForeman, http: aiohttp.ClientSession, open_page: OpenPage
) -> None:
    """Every control is reached with Tab and a job opens with Enter; text is AA contrast; nothing overflows."""
    server = await make_stub()
    foreman = await make_foreman(server.url)
    job_id = await submit_async(http, foreman, "llama3")
    await eventually(lambda: foreman.states() == ["done"], what="the job to finish")
    for width, height in [(1280, 800), (390, 844)]:
        page, console = await open_page(foreman, width, height)
        await _live(page)
        await expect(page.locator(f'#jobs tr[data-job="{job_id}"]')).to_be_visible(timeout=WAIT_MS)
        assert await page.evaluate("document.scrollingElement.scrollWidth <= window.innerWidth")
        assert await page.evaluate(CONTRAST_PROBE) == []
        for section in ("#overview", "#resident", "#queue", "#timeline svg", "#jobs"):
            assert await page.locator(section).is_visible()
        focused = []
        for _ in range(40):
            await page.keyboard.press("Tab")
            focused.append(
                await page.evaluate("document.activeElement.id || document.activeElement.textContent")
            )
            if focused[-1] == job_id:
                break
        assert {"window", "filter-state", "filter-model", job_id} <= set(focused)
        await page.keyboard.press("Enter")
        dialog = page.locator("#job")
        await expect(dialog).to_be_visible()
        await expect(page.locator("#job-title")).to_have_text(f"Job {job_id}")
        await expect(page.locator("#job-output")).to_have_text(re.compile(r"\w"), timeout=WAIT_MS)
        await expect(page.locator("#job-fields")).to_contain_text("done")
        assert await page.evaluate(CONTRAST_PROBE) == []
        await page.keyboard.press("Escape")
        await expect(dialog).to_be_hidden()
        assert console.errors == []
        await page.context.close()


async def test_on_a_shared_queue_the_page_lists_every_node_with_its_ollama(
    make_stub: MakeStub, make_foreman: MakeForeman, pg_url: str, open_page: OpenPage
) -> None:
    """Two nodes on one PostgreSQL queue: either node's page shows both, each with its own Ollama."""
    stubs = [await make_stub(capacity=1), await make_stub(capacity=1)]
    a = await make_foreman(stubs[0].url, db_path=pg_url, node="node-a")
    await make_foreman(stubs[1].url, db_path=pg_url, node="node-b")
    page, console = await open_page(a)
    await _live(page)
    panel = page.locator("#nodes-panel")
    await expect(panel).to_be_visible(timeout=WAIT_MS)
    for name, stub in zip(("node-a", "node-b"), stubs, strict=True):
        row = page.locator(f'#nodes tr[data-node="{name}"]')
        await expect(row).to_contain_text("alive", timeout=WAIT_MS)
        await expect(row.locator("td").nth(1)).to_contain_text(stub.url, timeout=WAIT_MS)
    assert console.errors == []


async def test_with_sqlite_the_page_shows_no_nodes_panel(foreman: Foreman, open_page: OpenPage) -> None:
    """One file, one node: the nodes panel stays hidden."""
    page, console = await open_page(foreman)
    await _live(page)
    await expect(page.locator("#nodes-panel")).to_be_hidden()
    assert console.errors == []


SWATCH_COLOURS = """(rows) => Object.fromEntries(rows.map((row) => [
  row.dataset.model || row.cells[1].textContent, getComputedStyle(row.querySelector('.swatch')).backgroundColor]))"""


async def _swatch_colours(page: Page) -> dict[str, str]:
    """Each listed model's swatch colour, read again while the list is being redrawn.

    A row the page replaced between finding the rows and reading them (the list
    reloads when a job's end arrives) is no longer in the document, and its
    colour reads as "".
    """
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        colours: dict[str, str] = await page.locator("#jobs tbody tr").evaluate_all(SWATCH_COLOURS)
        if all(colours.values()) or time.monotonic() > deadline:
            return colours
        await asyncio.sleep(0.05)


async def test_a_models_colour_comes_from_its_name_the_same_in_every_tab(
    foreman: Foreman, http: aiohttp.ClientSession, open_page: OpenPage
) -> None:
    """Tabs that met the models in different orders give each model one colour, and no two models share one."""
    first, console = await open_page(foreman)
    await _live(first)
    for model in ("llama3", "mistral", "qwen2"):
        await submit_async(http, foreman, model)
        await expect(first.locator(f'#jobs td:text-is("{model}:latest")')).to_have_count(1, timeout=WAIT_MS)
    await foreman.wait_states(lambda states: states == ["done"] * 3)
    second, _ = await open_page(foreman)  # meets them newest first, all at once
    await _live(second)
    colours = []
    for page in (first, second):
        await page.locator("#filter").get_by_role("button", name="Show").click()
        await expect(page.locator("#jobs tbody tr")).to_have_count(3, timeout=WAIT_MS)
        colours.append(await _swatch_colours(page))
    assert colours[0] == colours[1]
    assert len(set(colours[0].values())) == 3, colours[0]
    assert console.errors == []


async def test_a_model_ollama_lists_without_its_tag_is_the_tagged_one(
    make_stub: MakeStub, make_foreman: MakeForeman, http: aiohttp.ClientSession, open_page: OpenPage
) -> None:
    """/api/ps's `beta` is foreman's `beta:latest`: the resident row shows what foreman does with it, in its colour."""
    server = await make_stub(models=(StubModel("beta:latest"),))
    foreman = await make_foreman(server.url)
    job_id = await submit_async(http, foreman, "beta")
    await eventually(lambda: foreman.states() == ["done"], what="the job to finish")
    page, console = await open_page(foreman)

    async def untagged(route: Route) -> None:
        """/api/ps as Ollama may answer it: the model's name without its tag."""
        listed = await (await route.fetch()).json()
        for model in listed["models"]:
            model["name"] = model["model"] = model["name"].removesuffix(":latest")
        await route.fulfill(json=listed)

    await page.route("**/api/ps", untagged)
    await _live(page)
    resident = page.locator('#resident tr[data-model="beta"]')
    await expect(resident.locator("td").nth(1)).to_have_text("serving", timeout=WAIT_MS)
    job = page.locator(f'#jobs tr[data-job="{job_id}"]')
    await expect(job).to_be_visible(timeout=WAIT_MS)
    tagged = await job.locator(".swatch").evaluate("(s) => getComputedStyle(s).backgroundColor")
    await expect(resident.locator(".swatch")).to_have_css("background-color", tagged)
    assert console.errors == []


async def test_on_a_phone_each_job_shows_its_state_wait_and_run_time(
    foreman: Foreman, http: aiohttp.ClientSession, open_page: OpenPage
) -> None:
    """At 390 px the jobs list shows a job's state, wait and run time on screen, without scrolling sideways."""
    job_id = await submit_async(http, foreman, "llama3")
    await eventually(lambda: foreman.states() == ["done"], what="the job to finish")
    page, console = await open_page(foreman, 390, 844)
    await _live(page)
    cells = page.locator(f'#jobs tr[data-job="{job_id}"] td')
    await expect(cells.nth(2)).to_have_text("done", timeout=WAIT_MS)
    for index in (2, 4, 5):  # state, wait, run
        cell = cells.nth(index)
        await expect(cell).to_be_visible()
        box = await cell.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, (index, box)
    assert console.errors == []


async def test_the_resident_models_foreman_column_is_explained(foreman: Foreman, open_page: OpenPage) -> None:
    """The "foreman" column's header points at a visible note saying what serving, pinned and idle mean."""
    page, console = await open_page(foreman)
    await _live(page)
    header = page.locator("#resident thead th").nth(1)
    await expect(header).to_have_text("foreman")
    note = page.locator("#" + str(await header.get_attribute("aria-describedby")))
    await expect(note).to_be_visible()
    for word in ("serving", "pinned", "max_wait drain", "idle"):
        await expect(note).to_contain_text(word)
    assert console.errors == []


async def test_the_page_lists_batches_with_their_progress(
    make_stub: MakeStub, make_foreman: MakeForeman, http: aiohttp.ClientSession, open_page: OpenPage
) -> None:
    """A batch appears in the Batches panel with its status and progress, and shows `completed` at its end."""
    server = await make_stub()
    foreman = await make_foreman(server.url)
    page, console = await open_page(foreman)
    await _live(page)
    await expect(page.locator("#batches-panel")).to_be_hidden()
    server.stub.faults.hang_next(1)
    lines = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "llama3", "messages": [{"role": "user", "content": f"q{i}"}]},
        }
        for i in range(3)
    ]
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", "".join(json.dumps(line) + "\n" for line in lines), filename="in.jsonl")
    async with http.post(foreman.url + "/v1/files", data=form) as response:
        file_id = (await response.json())["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    async with http.post(foreman.url + "/v1/batches", json=body) as response:
        batch_id = (await response.json())["id"]
    row = page.locator(f'#batches tr[data-batch="{batch_id}"]')
    await expect(row).to_contain_text("in_progress", timeout=WAIT_MS)
    await expect(row).to_contain_text("0 done of 3", timeout=WAIT_MS)
    server.stub.faults.release_hung()
    await expect(row).to_contain_text("completed", timeout=WAIT_MS)
    await expect(row).to_contain_text("3 done of 3")
    assert await row.locator("progress").evaluate("bar => [bar.value, bar.max]") == [3, 3]
    assert console.errors == []


async def test_the_overview_says_when_ollama_went_silent(
    make_stub: MakeStub, make_foreman: MakeForeman, http: aiohttp.ClientSession, open_page: OpenPage
) -> None:
    """A request Ollama accepted and then never answered shows as a stall in the overview, with its time."""
    server = await make_stub()
    foreman = await make_foreman(server.url, stall_timeout=0.3)
    page, console = await open_page(foreman)
    await _live(page)
    overview = page.locator("#overview")
    await expect(overview).not_to_contain_text("Ollama stalls")
    server.stub.faults.hang_next(1)
    chat = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    async with http.post(foreman.url + "/api/chat", json=chat) as r:
        assert r.status == 200  # retried after the stall, and answered
    await expect(overview).to_contain_text(
        re.compile(r"Ollama stalls\s*1 \(0 in a row, last \d"), timeout=WAIT_MS
    )
    assert console.errors == []
