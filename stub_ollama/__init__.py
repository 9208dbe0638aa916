"""A fake Ollama server for tests and demos.

It speaks Ollama's HTTP API (``/api/chat``, ``/api/generate``, ``/api/embed``,
``/api/ps`` ..., and the OpenAI-compatible ``/v1/chat/completions``,
``/v1/completions``, ``/v1/embeddings`` and ``/v1/models``) with Ollama's shapes
and errors, and models the parts a proxy
depends on: which models are resident, slow loads, keep_alive, one FIFO load
queue, per-model parallel slots, NDJSON streaming. Everything it did is recorded
on :class:`Stub` (``app[STUB]``), and :class:`Faults` injects failures.
"""

from .app import create_app, stub_of
from .faults import Faults
from .generation import embedding, reply_tokens
from .keepalive import FOREVER, KeepAliveError, parse_go_duration, parse_keep_alive
from .names import normalise
from .server import StubServer
from .settings import StubModel, StubSettings
from .state import STUB, ResidentModel, Stub, StubRequest

__all__ = [
    "FOREVER",
    "STUB",
    "Faults",
    "KeepAliveError",
    "ResidentModel",
    "Stub",
    "StubModel",
    "StubRequest",
    "StubServer",
    "StubSettings",
    "create_app",
    "embedding",
    "normalise",
    "parse_go_duration",
    "parse_keep_alive",
    "reply_tokens",
    "stub_of",
]
