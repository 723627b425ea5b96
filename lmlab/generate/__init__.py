"""Text generation: the one causal decoding engine, encoder-decoder and mask-predict decoding, fill-mask."""
