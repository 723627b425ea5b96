"""Models in and out of the ecosystem's formats, and the one loader (`load.load_model`): lmlab checkpoints,
Hugging Face directories, GGUF, ARPA and word2vec files."""
