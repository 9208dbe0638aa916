"""foreman: a durable, model-aware queue in front of Ollama."""

__version__ = "0.1.0"
