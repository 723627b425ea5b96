"""Count-based n-gram models: counting (count.py), Kneser-Ney estimation (kn.py), scoring and sampling."""
