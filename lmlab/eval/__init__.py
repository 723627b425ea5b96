"""Evaluation: held-out loss, perplexity and bits per byte; pseudo-log-likelihood; word vectors; and the
in-context harness (harness/: zero-, one- and few-shot tasks, lm-eval adapter)."""
