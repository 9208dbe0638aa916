"""The aiohttp application: routes and the non-inference handlers.

Inference endpoints live in :mod:`stub_ollama.inference`. Run the app with
``handler_cancellation=True`` (``StubServer`` and aiohttp's ``TestServer`` do) so a
client that disconnects while queued or loading cancels its request, as in Ollama.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from .agent_apis import messages, responses
from .catalog import Installed, next_digest
from .hosts import guard_middleware, origin_allowed
from .inference import serve_inference
from .names import normalise
from .openai_compat import chat_completions, completions, embeddings, list_models, retrieve_model
from .settings import StubModel, StubSettings
from .state import STUB, Stub
from .transcriptions import transcriptions
from .wire import (
    NDJSON_TYPE,
    RequestError,
    error_response,
    json_response,
    local_time,
    ndjson_line,
    not_found_page,
    read_json_object,
    type_error,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def stub_of(app: web.Application) -> Stub:
    """The :class:`Stub` of an app made by :func:`create_app`."""
    return app[STUB]


# ------------------------------------------------------------------ simple ones


async def root(request: web.Request) -> web.StreamResponse:
    """``GET|HEAD /``: the liveness probe."""
    return web.Response(text="Ollama is running", content_type="text/plain")


async def version(request: web.Request) -> web.StreamResponse:
    """``GET|HEAD /api/version``."""
    return json_response({"version": request.app[STUB].settings.version})


def _tag_entry(model: Installed) -> dict[str, Any]:
    return {
        "name": model.name,
        "model": model.name,
        "modified_at": local_time(model.modified_at.timestamp()),
        "size": model.size,
        "digest": model.digest,
        "details": model.details(),
    }


async def tags(request: web.Request) -> web.StreamResponse:
    """``GET|HEAD /api/tags``: installed models, most recently modified first."""
    models = sorted(request.app[STUB].models.values(), key=lambda m: m.modified_at, reverse=True)
    return json_response({"models": [_tag_entry(m) for m in models]})


async def ps(request: web.Request) -> web.StreamResponse:
    """``GET /api/ps``: resident models, longest remaining expiry first."""
    stub = request.app[STUB]
    entries: list[tuple[float, dict[str, Any]]] = []
    for runner in stub.scheduler.runners.values():
        model = stub.models.get(runner.model)
        if model is None:  # deleted while loaded: Ollama keeps showing it
            model = Installed(runner.model, StubModel(runner.model), datetime.now().astimezone())
        expiry = runner.expiry()
        num_ctx = dict(runner.options).get("num_ctx")
        entries.append(
            (
                expiry,
                {
                    "name": model.name,
                    "model": model.name,
                    "size": model.size,
                    "digest": model.digest,
                    "details": model.details(),
                    "expires_at": local_time(expiry),
                    "size_vram": model.size,
                    "context_length": num_ctx if isinstance(num_ctx, int) else 0,
                },
            )
        )
    # Ollama compares whole seconds; forever sorts first.
    entries.sort(key=lambda e: -(math.inf if math.isinf(e[0]) else int(e[0])))
    return json_response({"models": [entry for _, entry in entries]})


async def _named_model(request: web.Request, go_type: str) -> tuple[dict[str, Any], str]:
    body = await read_json_object(request, go_type)
    for key in ("model", "name"):
        value = body.get(key)
        if value is not None and not isinstance(value, str):
            raise type_error(go_type.removeprefix("api."), key, "string", value)
    name = body.get("model") or body.get("name") or ""
    return body, name


async def _answer_errors(
    request: web.Request, work: Callable[[], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await work()
    except RequestError as err:
        return error_response(err.status, err.message)


async def show(request: web.Request) -> web.StreamResponse:
    """``POST /api/show``: model details; ``name`` is an alias of ``model``."""

    async def work() -> web.StreamResponse:
        stub = request.app[STUB]
        _body, name = await _named_model(request, "api.ShowRequest")
        if not name:
            raise RequestError(400, "model is required")
        model = stub.find(name)
        if model is None:
            raise RequestError(404, f"model '{name}' not found")
        num_ctx = stub.settings.num_ctx
        template = "{{ .Prompt }}" if model.kind == "completion" else ""
        modelfile = (
            '# Modelfile generated by "ollama show"\n'
            "# To build a new Modelfile based on this, replace FROM with:\n"
            f"# FROM {model.name}\n\n"
            f"FROM {model.blob_path()}\n"
            f'TEMPLATE """{template}"""\n'
            f"PARAMETER num_ctx {num_ctx}\n"
        )
        return json_response(
            {
                "license": "",
                "modelfile": modelfile,
                "parameters": f"num_ctx                        {num_ctx}",
                "template": template,
                "details": model.details(),
                "model_info": model.model_info(num_ctx),
                "capabilities": model.capabilities(),
                "modified_at": local_time(model.modified_at.timestamp()),
            }
        )

    return await _answer_errors(request, work)


def _pull_progress(name: str, total: int, digest: str) -> list[dict[str, Any]]:
    layer = f"sha256:{digest}"
    return [
        {"status": "pulling manifest"},
        {"status": f"pulling {digest[:12]}", "digest": layer, "total": total, "completed": 0},
        {"status": f"pulling {digest[:12]}", "digest": layer, "total": total, "completed": total // 2},
        {"status": f"pulling {digest[:12]}", "digest": layer, "total": total, "completed": total},
        {"status": "verifying sha256 digest"},
        {"status": "writing manifest"},
        {"status": "success"},
    ]


async def pull(request: web.Request) -> web.StreamResponse:
    """``POST /api/pull``: pretend to download; the model is installed afterwards."""

    async def work() -> web.StreamResponse:
        stub = request.app[STUB]
        body, name = await _named_model(request, "api.PullRequest")
        canonical = normalise(name)
        if canonical is None:
            raise RequestError(400, "invalid model name")
        existing = stub.models.get(canonical)
        spec = (
            existing.spec
            if existing
            else StubModel(canonical, kind="embedding" if "embed" in canonical else "completion")
        )
        # A pull of an installed model fetches what the registry holds now: new weights, new digest.
        entry = stub.install(spec, digest=next_digest(existing.digest) if existing else "")
        progress = _pull_progress(canonical, entry.size, entry.digest)
        if body.get("stream") is False:
            return json_response({"status": "success"})
        response = web.StreamResponse(headers={"Content-Type": NDJSON_TYPE})
        await response.prepare(request)
        for line in progress:
            await response.write(ndjson_line(line))
        await response.write_eof()
        return response

    return await _answer_errors(request, work)


async def delete(request: web.Request) -> web.StreamResponse:
    """``DELETE /api/delete``: remove an installed model (200 with no body)."""

    async def work() -> web.StreamResponse:
        stub = request.app[STUB]
        _body, name = await _named_model(request, "api.DeleteRequest")
        if normalise(name) is None:
            raise RequestError(400, f'name "{name}" is invalid')
        if not stub.uninstall(name):
            raise RequestError(404, f"model '{name}' not found")
        return web.Response(status=200)

    return await _answer_errors(request, work)


async def copy(request: web.Request) -> web.StreamResponse:
    """``POST /api/copy``: install ``destination`` as a copy of ``source``."""

    async def work() -> web.StreamResponse:
        stub = request.app[STUB]
        body = await read_json_object(request, "api.CopyRequest")
        source, destination = body.get("source"), body.get("destination")
        if not isinstance(source, str) or not isinstance(destination, str):
            raise RequestError(400, "source and destination are required")
        if not source or not destination:
            raise RequestError(400, "source and destination are required")
        target = normalise(destination)
        if target is None:
            raise RequestError(400, f'destination "{destination}" is invalid')
        model = stub.find(source)
        if model is None:
            raise RequestError(404, f'model "{source}" not found')
        # A copy is a second name for the same manifest.
        stub.install(dataclasses.replace(model.spec, name=target), digest=model.digest)
        return web.Response(status=200)

    return await _answer_errors(request, work)


def _inference(endpoint: Any) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await serve_inference(request, endpoint)

    handler.__name__ = f"{endpoint}_handler"
    handler.__doc__ = f"``POST /api/{endpoint}``."
    return handler


# ------------------------------------------------------------------ app setup


@web.middleware
async def _gin_not_found(request: web.Request, handler: Handler) -> web.StreamResponse:
    # gin answers unknown routes and wrong methods alike with a plain-text 404.
    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
        return not_found_page()


async def _cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    origin = request.headers.get("Origin")
    settings = request.app[STUB].settings
    if origin and origin_allowed(origin, request.host, settings.allowed_origins):
        response.headers.setdefault("Access-Control-Allow-Origin", origin)


async def _cleanup(app: web.Application) -> None:
    await app[STUB].close()


def create_app(settings: StubSettings | None = None) -> web.Application:
    """Build a stub Ollama application; its state is ``app[STUB]`` (see :func:`stub_of`)."""
    settings = settings or StubSettings()
    app = web.Application(
        middlewares=[
            _gin_not_found,
            guard_middleware(settings.check_host, settings.allowed_origins),
        ],
        client_max_size=64 * 1024 * 1024,
    )
    app[STUB] = Stub(settings)
    app.router.add_get("/", root)
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", ps, allow_head=False)
    app.router.add_post("/api/show", show)
    app.router.add_post("/api/pull", pull)
    app.router.add_delete("/api/delete", delete)
    app.router.add_post("/api/copy", copy)
    for endpoint in ("chat", "generate", "embed", "embeddings"):
        app.router.add_post(f"/api/{endpoint}", _inference(endpoint))
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/audio/transcriptions", transcriptions)
    app.router.add_get("/v1/models", list_models, allow_head=False)
    app.router.add_get("/v1/models/{model}", retrieve_model, allow_head=False)
    app.on_response_prepare.append(_cors_headers)
    app.on_cleanup.append(_cleanup)
    return app
