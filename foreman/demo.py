"""`foreman demo`: a stub Ollama, foreman in front of it, and a mixed workload to watch drain."""

from __future__ import annotations

import asyncio
import itertools
import sys
import tempfile
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web

from foreman import log as logging_setup
from foreman.app import create_app
from foreman.config import Config
from stub_ollama import StubServer, StubSettings

log = structlog.get_logger("foreman.demo")

MODELS = ("llama3", "mistral", "qwen2")


def demo(requests: int, load_delay: float) -> int:
    """Run the demo; returns the process exit code."""
    try:
        import ollama  # noqa: F401
    except ImportError:
        print(
            "foreman demo sends its workload with the official client: pip install 'foreman[demo]'",
            file=sys.stderr,
        )
        return 1
    logging_setup.configure("console", "info")
    try:
        asyncio.run(_demo(requests, load_delay))
    except KeyboardInterrupt:
        # asyncio.run has cancelled the workload and closed the servers on the way out.
        print("foreman demo: interrupted", file=sys.stderr)
        return 130
    return 0


async def _demo(requests: int, load_delay: float) -> None:
    import ollama

    settings = StubSettings(load_delay=load_delay, token_delay=0.02, tokens=6)
    async with StubServer(settings) as upstream:
        with tempfile.TemporaryDirectory(prefix="foreman-demo-") as tmp:
            config = Config(db_path=Path(tmp) / "foreman.db", upstream=upstream.url)
            runner = web.AppRunner(create_app(config), handler_cancellation=True, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            log.info("foreman.ready", upstream=config.upstream, db=str(config.db_path))
            url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            workload = [MODELS[i % len(MODELS)] for i in range(requests)]
            log.info(
                "demo.start",
                stub_ollama=upstream.url,
                foreman=url,
                load_delay_s=load_delay,
                arriving=" ".join(workload),
            )
            client = ollama.AsyncClient(host=url, trust_env=False)
            try:
                # A task group, so that Ctrl-C (which cancels this task) cancels every request too.
                async with asyncio.TaskGroup() as requests_in_flight, aiohttp.ClientSession() as http:
                    for i, model in enumerate(workload):
                        message = {"role": "user", "content": f"request {i}"}
                        requests_in_flight.create_task(client.chat(model=model, messages=[message]))
                        # Each request is in the queue before the next leaves, so they queue in the
                        # order listed above (a fixed pause was overtaken on a busy machine).
                        await _queued(http, url, i + 1)
            finally:
                await client.close()  # type: ignore[no-untyped-call]
                await runner.cleanup()
            served = [r.model for r in upstream.stub.inference_requests()]
            fifo_loads = 1 + sum(a != b for a, b in itertools.pairwise(workload))
            log.info(
                "demo.summary",
                served=" ".join(str(m) for m in served),
                loads=len(upstream.stub.loads),
                loads_if_fifo=fifo_loads,
            )


async def _queued(http: aiohttp.ClientSession, url: str, jobs: int) -> None:
    """Until foreman holds `jobs` jobs, asking `GET /jobs`; after 10 s the demo goes on regardless."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while loop.time() < deadline:
        async with http.get(f"{url}/jobs", params={"limit": str(jobs)}) as response:
            if len((await response.json())["jobs"]) >= jobs:
                return
        await asyncio.sleep(0.005)
