"""Sentences of words for word2vec: any corpus `lmlab prepare` reads, tokenised as word2vec does."""

from __future__ import annotations

from lmlab.data.sources import Corpus
from lmlab.errors import LmlabError
from lmlab.models.word2vec.model import MAX_SENTENCE, tokenize


def read_sentences(source: str, doc_split: str = "line") -> list[list[str]]:
    """Tokenised sentences of a text file, folder, glob, JSONL or built-in corpus (data/sources.py)."""
    sentences = []
    for doc in Corpus(source, doc_split=doc_split):
        words = tokenize(doc)
        sentences += [words[i:i + MAX_SENTENCE] for i in range(0, len(words), MAX_SENTENCE)]
    if not sentences:
        raise LmlabError(f"word2vec: the corpus {source} holds no words")
    return sentences
