"""Model names and the grouping key that decides what counts as "the same model"."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# Options that make Ollama reload a model it already holds (Options.Runner in
# ollama's api/types.go): two requests that differ in these cost a swap even
# when they name the same model, so they group apart.
RUNNER_OPTIONS = frozenset(
    {"num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread", "low_vram", "use_mlock", "numa"}
)

_DEFAULT_PREFIXES = ("registry.ollama.ai/library/", "registry.ollama.ai/", "library/")


def normalise_model(name: str) -> str:
    """Ollama's shortest display form: `Llama3` → `llama3:latest`."""
    short = name.strip().lower()
    for prefix in _DEFAULT_PREFIXES:
        if short.startswith(prefix):
            short = short[len(prefix) :]
            break
    last_segment = short.rsplit("/", 1)[-1]
    if ":" not in last_segment and "@" not in last_segment:
        short += ":latest"
    return short


def load_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The subset of `options` that decides how Ollama loads the model."""
    if not options:
        return {}
    return {k: v for k, v in options.items() if k in RUNNER_OPTIONS and v is not None}


def model_key(name: str, options: Mapping[str, Any] | None) -> str:
    """The unit foreman drains by: `llama3:latest`, or `llama3:latest {"num_ctx":8192}`."""
    base = normalise_model(name)
    runner = load_options(options)
    if not runner:
        return base
    return f"{base} {json.dumps(runner, sort_keys=True, separators=(',', ':'))}"


def key_model_name(key: str) -> str:
    """The normalised model name inside a model key."""
    return key.split(" ", 1)[0]


def key_load_options(key: str) -> dict[str, Any]:
    """The load options inside a model key, as `model_key` put them there."""
    _, _, options = key.partition(" ")
    loaded: dict[str, Any] = json.loads(options) if options else {}
    return loaded
