"""Fill-in-the-blank with a masked language model: the top-k fillers of every `<mask>` in a text."""

from __future__ import annotations

import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.tokenizers import Tokenizer


def encode_with_masks(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of `text` with each literal mask string (e.g. "<mask>") as the mask token, whatever
    the tokenizer would make of the string itself (a char tokenizer would spell it out)."""
    mask = tok.specials.mask
    mask_id = tok.token_to_id(mask)
    if mask_id is None:
        raise LmlabError(f"the tokenizer has no mask token '{mask}'")
    pieces = text.split(mask)
    if len(pieces) < 2:
        raise LmlabError(f"the text has no '{mask}' to fill")
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i:
            ids.append(mask_id)
        ids += tok.encode(piece) if piece else []
    return ids


@torch.no_grad()
def fill_mask(model: nn.Module, tok: Tokenizer, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each mask in `text`, in order: the `top_k` (token, probability) pairs, most likely first."""
    if getattr(model, "objective", "causal") != "mlm":
        raise LmlabError(f"fill-mask needs a masked language model (e.g. BERT), not '{model.config.family}'")
    ids = encode_with_masks(tok, text)
    if len(ids) > model.config.block_size:
        raise LmlabError(f"the text is {len(ids)} tokens, more than the model's block_size {model.config.block_size}")
    model.eval()
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    logits = model(x).logits[0]
    out = []
    for pos in (x[0] == tok.token_to_id(tok.specials.mask)).nonzero()[:, 0].tolist():
        p = torch.softmax(logits[pos].float(), dim=-1)
        top = torch.topk(p, min(top_k, p.numel()))
        out.append([(tok.decode([i]), float(v)) for v, i in zip(top.values.tolist(), top.indices.tolist())])
    return out
