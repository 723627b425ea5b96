"""lmlab: language models from n-grams to LLMs — implement, train, evaluate and serve them."""

__version__ = "0.1.0"
