"""In-context evaluation: one `LM` interface for every model (lm.py), few-shot runs and reports, lm-eval."""
