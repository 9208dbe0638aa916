"""Ollama's own API, `/api/*`: what its replies look like."""
