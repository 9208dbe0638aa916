"""Made-up but stable metadata for installed models: digests, sizes, families."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from .names import base_name
from .settings import StubModel

# Realistic figures for the default models; others get hash-derived ones.
_KNOWN: dict[str, tuple[str, str, int, str]] = {
    # base name: (family, parameter size, bytes, quantisation)
    "llama3": ("llama", "8.0B", 4_661_224_676, "Q4_0"),
    "mistral": ("llama", "7.2B", 4_113_301_824, "Q4_0"),
    "qwen2": ("qwen2", "7.6B", 4_431_400_262, "Q4_0"),
    "nomic-embed-text": ("nomic-bert", "137M", 274_302_450, "F16"),
}


def first_digest(name: str) -> str:
    """The digest a model has before anything re-pulls it."""
    return hashlib.sha256(name.encode()).hexdigest()


def next_digest(digest: str) -> str:
    """The digest after a pull: a different one, derived so runs stay reproducible."""
    return hashlib.sha256(f"{digest}+pull".encode()).hexdigest()


@dataclass(slots=True)
class Installed:
    """An installed model as the stub tracks it."""

    name: str  # canonical display name, e.g. "llama3:latest"
    spec: StubModel
    modified_at: datetime  # local zone, like Ollama's manifest times
    # The manifest digest: sha256 hex of the name at first, a new one after
    # every pull (the registry may hold newer weights), the source's after a copy.
    digest: str = ""

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = first_digest(self.name)

    @property
    def kind(self) -> str:
        """``completion`` or ``embedding``."""
        return self.spec.kind

    def _facts(self) -> tuple[str, str, int, str]:
        base = base_name(self.name)
        known = _KNOWN.get(base)
        if known is not None:
            return known
        seed = int(self.digest[:8], 16)
        family = "bert" if self.kind == "embedding" else "llama"
        size = 1_000_000_000 + seed % 7_000_000_000
        return family, f"{size / 5.6e8:.1f}B", size, "Q4_K_M"

    @property
    def size(self) -> int:
        """Bytes on disk (and in VRAM when loaded)."""
        return self._facts()[2]

    @property
    def family(self) -> str:
        """Model architecture family."""
        return self._facts()[0]

    def details(self) -> dict[str, object]:
        """The ``details`` object of ``/api/tags``, ``/api/ps`` and ``/api/show``."""
        family, params, _size, quant = self._facts()
        return {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": params,
            "quantization_level": quant,
        }

    def capabilities(self) -> list[str]:
        """What ``/api/show`` lists; decides chat/generate support."""
        if self.kind == "embedding":
            return ["embedding"]
        return ["completion", "tools"]

    def blob_path(self) -> str:
        """Path of the model weights, as ``FROM`` in the modelfile."""
        if self.spec.blob_path:
            return self.spec.blob_path
        return f"/usr/share/ollama/.ollama/models/blobs/sha256-{self.digest}"

    def model_info(self, num_ctx: int) -> dict[str, object]:
        """A small ``model_info`` map for ``/api/show``."""
        family = self.family
        return {
            "general.architecture": family,
            "general.basename": base_name(self.name),
            "general.file_type": 2,
            "general.parameter_count": self.size * 2,
            "general.quantization_version": 2,
            f"{family}.context_length": max(num_ctx, 8192),
            f"{family}.embedding_length": 768 if self.kind == "embedding" else 4096,
        }
