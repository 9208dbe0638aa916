"""Model names and the grouping key that decides what counts as "the same model"."""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

# Options that make Ollama reload a model it already holds (Options.Runner in
# ollama's api/types.go): two requests that differ in these cost a swap even
# when they name the same model, so they group apart.
RUNNER_OPTIONS = frozenset(
    {"num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread", "low_vram", "use_mlock", "numa"}
)

_DEFAULT_PREFIXES = ("registry.ollama.ai/library/", "registry.ollama.ai/", "library/")


@lru_cache(maxsize=4096)  # a handful of names, asked for several times a request
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


def source_suffix(name: str) -> tuple[str, str | None]:
    """The name without its source suffix, and the source it asks for: "cloud", "local" or None.

    Ollama's rule (`internal/modelref`, `parseSourceSuffix`): a last `:cloud`
    or `:local` tag names the source, and so does a tag ending in `-cloud`
    (`gpt-oss:120b-cloud`). A cloud model runs on Ollama's cloud: nothing
    loads on this machine's GPU.
    """
    colon = name.rfind(":")
    if colon < 0:
        return name, None
    tag = name[colon + 1 :].strip()
    lowered = tag.lower()
    if lowered in ("cloud", "local"):
        return name[:colon], lowered
    if "/" not in tag and lowered.endswith("-cloud"):
        return name[: colon + 1] + tag[: -len("-cloud")], "cloud"
    return name, None


def is_cloud(name: str) -> bool:
    """Whether Ollama sends a request for `name` (a model name or key) to its cloud."""
    return source_suffix(key_model_name(name))[1] == "cloud"


def model_key(name: str, options: Mapping[str, Any] | None) -> str:
    """The unit foreman drains by: `llama3:latest`, or `llama3:latest {"num_ctx":8192}`.

    `llama3:local` is `llama3` asked for on this machine: the same key. A
    cloud name keeps its suffix, so its key says where it runs.
    """
    base, source = source_suffix(name.strip())
    base = normalise_model(base if source == "local" else name)
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
