"""Serving: chat sessions (and, later, an OpenAI-compatible HTTP server)."""
