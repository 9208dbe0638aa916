"""``python -m stub_ollama``: run a stub Ollama until Ctrl-C.

Example::

    python -m stub_ollama --port 11434 --models llama3,mistral,qwen2 \\
        --embed-models nomic-embed-text --capacity 1 --load-delay 2.0 \\
        --token-delay 0.05 --tokens 8

One log line per load, unload and request goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from .faults import DEFAULT_ERROR
from .keepalive import KeepAliveError, parse_env_keep_alive
from .names import normalise
from .server import StubServer
from .settings import StubModel, StubSettings


def _names(text: str) -> list[str]:
    """Comma-separated model names, normalised as Ollama does (the defaults are strings so they pass here too)."""
    names = []
    for raw in text.split(","):
        if not raw.strip():
            continue
        name = normalise(raw)
        if name is None:
            raise argparse.ArgumentTypeError(f"invalid model name {raw.strip()!r}")
        names.append(name)
    return names


def _keep_alive(text: str) -> float:
    try:
        return parse_env_keep_alive(text)
    except KeepAliveError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    defaults = StubSettings()
    parser = argparse.ArgumentParser(
        prog="python -m stub_ollama",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument(
        "--models",
        type=_names,
        default="llama3,mistral,qwen2",
        help="comma-separated completion models (default: %(default)s)",
    )
    parser.add_argument(
        "--embed-models",
        type=_names,
        default="nomic-embed-text",
        help="comma-separated embedding models (default: %(default)s)",
    )
    parser.add_argument(
        "--capacity",
        type=int,
        default=defaults.capacity,
        help="models that fit at once (default: %(default)s)",
    )
    parser.add_argument(
        "--load-delay",
        type=float,
        default=defaults.load_delay,
        help="seconds a load takes (default: %(default)s)",
    )
    parser.add_argument(
        "--token-delay",
        type=float,
        default=defaults.token_delay,
        help="seconds between streamed tokens (default: %(default)s)",
    )
    parser.add_argument(
        "--tokens", type=int, default=defaults.tokens, help="tokens per reply (default: %(default)s)"
    )
    parser.add_argument(
        "--keep-alive",
        type=_keep_alive,
        # argparse converts a string default with `type`, so a bad value is a usage error.
        default=os.environ.get("OLLAMA_KEEP_ALIVE") or defaults.default_keep_alive,
        help="default keep_alive, e.g. 5m or 300 (default: OLLAMA_KEEP_ALIVE, else 300 s)",
    )
    parser.add_argument(
        "--fail-model",
        type=_names,
        default="",
        help="comma-separated models every inference request for which fails (Faults.fail_model)",
    )
    parser.add_argument(
        "--fail-status",
        type=int,
        default=500,
        help="status of --fail-model's failures (default: %(default)s)",
    )
    parser.add_argument(
        "--fail-error",
        default=DEFAULT_ERROR,
        help="error message of --fail-model's failures (default: %(default)r)",
    )
    parser.add_argument(
        "--fail-loads", action="store_true", help="--fail-model's load requests fail too, not only its jobs"
    )
    parser.add_argument(
        "--num-parallel",
        type=int,
        default=defaults.num_parallel,
        help="parallel requests per model (default: %(default)s)",
    )
    parser.add_argument(
        "--embedding-dims",
        type=int,
        default=defaults.embedding_dims,
        help="floats per embedding vector (default: %(default)s; nomic-embed-text has 768)",
    )
    parser.add_argument(
        "--embed-call-delay",
        type=float,
        default=defaults.embed_call_delay,
        help="seconds every embed call costs (default: %(default)s)",
    )
    parser.add_argument(
        "--embed-input-delay",
        type=float,
        default=defaults.embed_input_delay,
        help="seconds each input of an embed call adds (default: %(default)s)",
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> StubSettings:
    """Turn parsed arguments into settings."""
    models = [StubModel(n) for n in args.models]
    models += [StubModel(n, kind="embedding") for n in args.embed_models]
    return StubSettings(
        models=tuple(models),
        capacity=args.capacity,
        load_delay=args.load_delay,
        token_delay=args.token_delay,
        tokens=args.tokens,
        default_keep_alive=args.keep_alive,
        num_parallel=args.num_parallel,
        embedding_dims=args.embedding_dims,
        embed_call_delay=args.embed_call_delay,
        embed_input_delay=args.embed_input_delay,
    )


async def _serve(settings: StubSettings, host: str, port: int, args: argparse.Namespace) -> None:
    server = StubServer(settings)
    await server.start(host, port)
    for model in args.fail_model:
        server.stub.faults.fail_model(model, args.fail_status, args.fail_error, include_loads=args.fail_loads)
    logging.getLogger("stub_ollama").info(
        "stub Ollama listening on %s (models: %s)", server.url, ", ".join(server.stub.installed())
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGTERM (and SIGINT even where a shell left it ignored) stops the server cleanly.
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        logging.getLogger("stub_ollama").info("stopping")
        await server.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(settings, args.host, args.port, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
