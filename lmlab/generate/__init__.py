"""Text generation: sampling filters and the decoding engine."""
