"""Ollama's OpenAI-compatible API, `/v1/*`: what its requests must look like, and its replies.

Named so as not to shadow the `openai` client package.
"""
