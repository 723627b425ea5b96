"""Shared building blocks: norms, positions, attention, MLPs, blocks, KV cache, sampling filters, quantization."""
