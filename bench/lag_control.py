"""A control for foreman's event-loop lag: an idle event loop with the same probe, on the same machine.

    python -m bench.lag_control --port 18090     # GET /metrics: foreman_event_loop_lag_seconds

It does nothing but tick, so whatever lag it shows is the machine's (other
processes taking the CPU, timer slack), not foreman's: the benchmarks read it
over the same window as foreman's own.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from foreman.looplag import LoopLag


def create_app() -> web.Application:
    registry = CollectorRegistry()
    lag = LoopLag()
    registry.register(lag)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    async def probe_ctx(app: web.Application) -> AsyncIterator[None]:
        lag.start()
        yield
        lag.stop()

    app = web.Application()
    app.cleanup_ctx.append(probe_ctx)
    app.router.add_get("/metrics", metrics)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(create_app(), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
