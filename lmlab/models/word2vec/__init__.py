"""word2vec: skip-gram and CBOW by negative sampling (model.py, its numba kernel) and word vectors."""
