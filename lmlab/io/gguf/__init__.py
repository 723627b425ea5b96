"""GGUF (llama.cpp's format): reading a model and its tokenizer, and writing one."""
