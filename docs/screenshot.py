"""Take docs/ui.png, the live page's picture in the README.

Runs a stub Ollama and foreman in this process, sends a mixed batch over
three models, and photographs /ui in headless Chromium while the queue drains:

    python docs/screenshot.py                      # needs '.[test]' and Debian's chromium
    python docs/screenshot.py --phone docs/ui-phone.png
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as `python docs/screenshot.py`: foreman from this checkout, and the UI test's browser.
sys.path[1:1] = [str(ROOT), str(ROOT / "tests")]

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from foreman.app import create_app  # noqa: E402
from foreman.config import Config  # noqa: E402
from stub_ollama import StubModel, StubServer, StubSettings  # noqa: E402
from tests.support.browser import headless_chromium  # noqa: E402

MODELS = ("llama3", "mistral", "qwen2")


async def main(out: Path, width: int, height: int) -> None:
    models = tuple(StubModel(f"{m}:latest") for m in MODELS)
    stub = StubServer(StubSettings(models=models, load_delay=1.5, token_delay=0.05, tokens=24))
    await stub.start()
    with tempfile.TemporaryDirectory() as tmp:
        config = Config(db_path=Path(tmp) / "foreman.db", upstream=stub.url)
        runner = web.AppRunner(create_app(config), handler_cancellation=True)  # as foreman serve runs it
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        url = f"http://127.0.0.1:{port}"
        try:
            async with headless_chromium() as browser, aiohttp.ClientSession() as http:
                page = await browser.new_page(viewport={"width": width, "height": height})
                await page.goto(url + "/ui")
                await page.wait_for_selector("#connection:text('live')")
                for round_ in range(4):
                    for model in MODELS:
                        body = {"model": model, "messages": [{"role": "user", "content": f"hello {round_}"}]}
                        async with http.post(
                            url + "/api/chat", json=body, headers={"Prefer": "respond-async"}
                        ):
                            pass
                # Two models drained, the third one at work: the picture has a bit of everything.
                await page.locator("#swaps li[data-reason]").nth(2).wait_for(timeout=60_000)
                await page.locator("#running .running-job").first.wait_for(timeout=30_000)
                await page.locator("#output:text-matches('.{20}')").wait_for(timeout=30_000)
                await page.screenshot(path=str(out))
        finally:
            await runner.cleanup()
            await stub.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", nargs="?", type=Path, default=Path(__file__).parent / "ui.png")
    parser.add_argument("--phone", action="store_true", help="390x844 instead of 1280x800")
    args = parser.parse_args()
    size = (390, 844) if args.phone else (1280, 800)
    asyncio.run(main(args.out, *size))
