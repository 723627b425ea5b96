"""ELIZA (Weizenbaum 1966): a keyword script and the session that applies it."""
