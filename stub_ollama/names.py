"""Model-name normalisation, following Ollama's ``types/model/name.go``.

A name is ``[host/][namespace/]model[:tag]`` with defaults ``registry.ollama.ai``,
``library`` and ``latest``. Ollama matches names case-insensitively and shows the
shortest form, so ``Llama3``, ``llama3:latest`` and
``registry.ollama.ai/library/llama3:latest`` are one model: ``llama3:latest``.
"""

from __future__ import annotations

import re

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

# Ollama's part rules, slightly simplified: alphanumerics, "_", "-", "." (and ":" in
# the host for a port), starting with an alphanumeric or "_".
_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,79}$")
_HOST = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-:]{0,349}$")


def normalise(name: str) -> str | None:
    """Return the canonical (shortest, lower-case) form of ``name``, or ``None`` if invalid."""
    name = name.strip()
    if not name:
        return None
    # A digest suffix ("@sha256:...") names the same model; drop it.
    name = name.split("@", 1)[0]
    tag = DEFAULT_TAG
    slash = name.rfind("/")
    colon = name.rfind(":")
    # A ":" before the last "/" belongs to a host's port, not to the tag.
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    parts = name.split("/")
    if len(parts) > 3:
        return None
    host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
    if len(parts) == 3:
        host, namespace, model = parts
    elif len(parts) == 2:
        namespace, model = parts
    else:
        (model,) = parts
    if not (_HOST.match(host) and _PART.match(namespace) and _PART.match(model)):
        return None
    if not _PART.match(tag):
        return None
    host, namespace, model, tag = host.lower(), namespace.lower(), model.lower(), tag.lower()
    if host == DEFAULT_HOST:
        if namespace == DEFAULT_NAMESPACE:
            return f"{model}:{tag}"
        return f"{namespace}/{model}:{tag}"
    return f"{host}/{namespace}/{model}:{tag}"


def base_name(name: str) -> str:
    """The model part of a canonical name without namespace or tag (``llama3``)."""
    return name.rsplit("/", 1)[-1].split(":", 1)[0]


def is_cloud(name: str) -> bool:
    """Whether ``name`` asks for Ollama's cloud: a ``:cloud`` or ``-cloud`` tag (``internal/modelref``)."""
    colon = name.rfind(":")
    if colon < 0:
        return False
    suffix = name[colon + 1 :].strip()
    return suffix.lower() == "cloud" or ("/" not in suffix and suffix.lower().endswith("-cloud"))
