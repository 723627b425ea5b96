"""Serving: chat templates (and, later, an OpenAI-compatible HTTP server)."""
