"""Run the stub on a real port, and take it down and up again like a restarting Ollama."""

from __future__ import annotations

import contextlib
from types import TracebackType

from aiohttp import web

from .app import Handler, create_app
from .settings import StubSettings
from .state import STUB, Stub

_SHUTDOWN_TIMEOUT_S = 0.25  # how long close() lets a request in flight finish


class StubServer:
    """A stub Ollama listening on a TCP port.

    ``await start()`` (or ``async with StubServer(settings) as server:``) listens;
    :meth:`stop_listening` refuses new connections and drops open ones while
    keeping the port; :meth:`resume_listening` listens on the same port again.
    """

    def __init__(self, settings: StubSettings | None = None) -> None:
        self.app = create_app(settings)
        self.app.middlewares.insert(0, self._refuse_while_down)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._host = "127.0.0.1"
        self._port = 0

    @property
    def stub(self) -> Stub:
        """The live state (``app[STUB]``)."""
        return self.app[STUB]

    @property
    def port(self) -> int:
        """The TCP port (known after :meth:`start`)."""
        return self._port

    @property
    def host(self) -> str:
        """The address the server binds."""
        return self._host

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:11434``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    @property
    def listening(self) -> bool:
        """Whether the server accepts connections now."""
        return self._site is not None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Start listening on ``host:port`` (port 0 picks a free port)."""
        if self._runner is not None:
            raise RuntimeError("StubServer already started")
        # handler_cancellation: a client that goes away cancels its request, as in Ollama.
        # shutdown_timeout: a connection accepted just as the listener closed gets
        # its handler after close() dropped the others; aiohttp would wait 60 s for it.
        self._runner = web.AppRunner(
            self.app, handler_cancellation=True, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_S
        )
        await self._runner.setup()
        self._host = host
        self._port = port
        await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        await site.start()
        self._site = site
        if not self._port:
            self._port = int(self._runner.addresses[0][1])

    @web.middleware
    async def _refuse_while_down(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # A connection accepted in the instant the listener closed outlives the
        # drop; a stopped Ollama would not answer it, so neither does the stub.
        if self._site is None:
            transport = request.transport
            if transport is not None:
                transport.abort()
            raise web.HTTPServiceUnavailable()
        return await handler(request)

    def _drop_connections(self) -> None:
        assert self._runner is not None
        server = self._runner.server
        if server is None:
            return
        for connection in server.connections:
            transport = connection.transport
            if transport is not None:
                transport.abort()

    async def stop_listening(self, reset_state: bool = True) -> None:
        """Refuse new connections and abort open ones, keeping the port for later.

        With ``reset_state`` (the default) the loaded models and the pending queue
        are forgotten, as when Ollama restarts (each resident model is recorded as
        an eviction).
        """
        if self._runner is None:
            raise RuntimeError("StubServer not started")
        if self._site is not None:
            await self._site.stop()
            self._site = None
        self._drop_connections()
        if reset_state:
            self.stub.restart()

    async def resume_listening(self) -> None:
        """Listen again on the same host and port."""
        if self._runner is None:
            raise RuntimeError("StubServer not started")
        if self._site is None:
            await self._listen()

    async def close(self) -> None:
        """Stop everything; open connections are aborted rather than waited for."""
        if self._runner is None:
            return
        if self._site is not None:
            with contextlib.suppress(RuntimeError):
                await self._site.stop()
            self._site = None
        self._drop_connections()
        await self._runner.cleanup()
        self._runner = None

    async def __aenter__(self) -> StubServer:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
