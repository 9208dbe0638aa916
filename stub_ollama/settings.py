"""Configuration of a stub Ollama server: which models exist and how slow things are."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ModelKind = Literal["completion", "embedding"]


@dataclass(frozen=True, slots=True)
class StubModel:
    """An installed model.

    ``kind`` decides the capabilities (``completion`` models chat and generate,
    ``embedding`` models only embed). ``load_delay`` overrides
    :attr:`StubSettings.load_delay` for this model. ``blob_path`` is what
    ``/api/show`` puts after ``FROM`` in the modelfile.
    """

    name: str
    kind: ModelKind = "completion"
    load_delay: float | None = None
    blob_path: str | None = None


def _default_models() -> tuple[StubModel, ...]:
    return (
        StubModel("llama3:latest"),
        StubModel("mistral:latest"),
        StubModel("qwen2:latest"),
        StubModel("nomic-embed-text:latest", kind="embedding"),
    )


@dataclass(frozen=True, slots=True)
class StubSettings:
    """Everything that shapes the stub's behaviour; all times are in seconds.

    The first group mirrors what the brief asks for; the rest are extras with
    Ollama's defaults (``max_queue`` is ``OLLAMA_MAX_QUEUE``, ``num_ctx`` the
    default context length, ``check_host`` turns the DNS-rebinding guard on,
    ``allowed_origins`` adds ``OLLAMA_ORIGINS`` patterns).
    """

    models: tuple[StubModel, ...] = field(default_factory=_default_models)
    capacity: int = 1
    load_delay: float = 0.0
    token_delay: float = 0.0
    tokens: int = 8
    default_keep_alive: float = 300.0
    num_parallel: int = 1
    embedding_dims: int = 8
    # An embed call's cost, as Ollama's: a fixed part per call (the request, the
    # batch set-up) plus a part per input, paid while the call holds a runner
    # slot, so with num_parallel=1 calls run one at a time.
    embed_call_delay: float = 0.0
    embed_input_delay: float = 0.0
    version: str = "0.33.0"
    max_queue: int = 512
    num_ctx: int = 4096
    check_host: bool = True
    allowed_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError("capacity must be at least 1")
        if self.num_parallel < 1:
            raise ValueError("num_parallel must be at least 1")
        if self.tokens < 0:
            raise ValueError("tokens must not be negative")
        if self.embed_call_delay < 0 or self.embed_input_delay < 0:
            raise ValueError("embed delays must not be negative")
        if self.embedding_dims < 1:
            raise ValueError("embedding_dims must be at least 1")
