"""Evaluation: held-out loss, perplexity and bits per byte; zero-, one- and few-shot accuracy (fewshot.py)."""
