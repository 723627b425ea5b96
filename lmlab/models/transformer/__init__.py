"""Transformer families on the shared blocks of lmlab/nn: a causal decoder (GPT, Llama), BERT, BART and the CMLM."""
