"""Shared building blocks that every Transformer family assembles."""
