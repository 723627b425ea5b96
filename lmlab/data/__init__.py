"""Text sources -> tokenizer + token shards -> batches of windows."""
