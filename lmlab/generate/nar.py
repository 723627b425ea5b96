"""Non-autoregressive decoding by mask-predict (Ghazvininejad et al. 2019, section 3.2).

From a conditional masked LM (lmlab/models/transformer/cmlm.py): pick the target length L from the length head
(the `length_beam` most likely lengths, each decoded in parallel), start from L <mask> tokens and
predict all of them at once (iteration 1). Then, for t = 1 .. T-1, re-mask the n = L (T - t) / T
tokens the model is least sure of and predict those again from the rest, keeping each token's
probability from the iteration that last predicted it. T iterations cost T decoder passes whatever
L is, where left-to-right decoding costs L. Among the length candidates the one with the highest
mean log-probability wins (the paper's length beam).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.tokenizers import Tokenizer


@dataclass(kw_only=True)
class MaskPredictConfig:
    iterations: int = 10   # T
    length_beam: int = 1   # l: candidate lengths decoded per input


@dataclass
class MaskPredictOutput:
    tokens: torch.Tensor           # [B, max L] best candidate per input, right-padded with <pad>
    lengths: torch.Tensor          # [B]
    scores: torch.Tensor           # [B] mean log-probability of the chosen candidate
    n_masked: list[torch.Tensor] = field(default_factory=list)  # re-masked per candidate row, iterations 2..T


def remask_count(length: torch.Tensor, t: int, iterations: int) -> torch.Tensor:
    """Tokens to re-mask before iteration t + 1 (t = 1 .. T-1): n = floor(L (T - t) / T), the paper's
    linear decay from almost all tokens to none."""
    return torch.div(length * (iterations - t), iterations, rounding_mode="floor")


@torch.no_grad()
def mask_predict(model: nn.Module, input_ids: torch.Tensor, cfg: MaskPredictConfig,
                 attention_mask: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> MaskPredictOutput:
    """Decode a batch of sources ([B, S], right-padded); `lengths` ([B]) forces the target lengths."""
    c = model.config
    if cfg.iterations < 1 or cfg.length_beam < 1:
        raise ValueError("mask-predict needs iterations >= 1 and length_beam >= 1")
    model.eval()
    B, dev = input_ids.shape[0], input_ids.device
    memory = model.encode(input_ids, attention_mask)
    if lengths is None:
        scores = model.length_logits(memory, attention_mask).float()
        scores[:, 0] = float("-inf")  # an empty target is never a candidate
        lb = min(cfg.length_beam, scores.shape[1] - 1)
        cand_len = scores.topk(lb, dim=-1).indices  # [B, lb]
    else:
        lb, cand_len = 1, lengths.to(dev).clamp(1, c.block_size)[:, None]
    rows = B * lb
    L = cand_len.reshape(rows)
    cross = [(k.repeat_interleave(lb, 0), v.repeat_interleave(lb, 0)) for k, v in model.cross_kv(memory)]
    enc_mask = attention_mask.repeat_interleave(lb, 0) if attention_mask is not None else None

    width = int(L.max())
    real = torch.arange(width, device=dev)[None, :] < L[:, None]        # [rows, width]
    tokens = torch.full((rows, width), c.pad_id, dtype=torch.long, device=dev)
    logp = torch.zeros(rows, width, device=dev)
    masked = real.clone()
    never = [c.pad_id, c.mask_id, c.eos_id]  # tokens a target never holds (lmlab/data/seq2seq.py)
    n_masked = []
    for t in range(cfg.iterations):
        if t > 0:  # re-mask the n least confident tokens (pads rank last: +inf)
            n = remask_count(L, t, cfg.iterations)
            rank = logp.masked_fill(~real, float("inf")).argsort(dim=1).argsort(dim=1)
            masked = rank < n[:, None]
            n_masked.append(masked.sum(dim=1))
        dec_in = torch.where(masked, c.mask_id, tokens).masked_fill(~real, c.pad_id)
        out = F.log_softmax(model.predict(cross, dec_in, attention_mask=enc_mask).float(), dim=-1)
        out[..., never] = float("-inf")
        best_logp, best = out.max(dim=-1)
        tokens = torch.where(masked, best, tokens)
        logp = torch.where(masked, best_logp, logp)

    mean = (logp * real).sum(dim=1) / L  # the length beam's criterion: mean log-probability
    pick = mean.view(B, lb).argmax(dim=1) + torch.arange(B, device=dev) * lb
    best_len = L[pick]
    out_tokens = tokens[pick, :int(best_len.max())]
    return MaskPredictOutput(tokens=out_tokens, lengths=best_len, scores=mean[pick], n_masked=n_masked)


def nar_generate_text(model: nn.Module, tok: Tokenizer, sources: list[str], cfg: MaskPredictConfig) -> list[str]:
    from lmlab.generate.seq2seq import encode_sources

    device = next(model.parameters()).device
    x, mask = encode_sources(tok, sources, model.config.block_size, device)
    out = mask_predict(model, x, cfg, attention_mask=mask)
    return [tok.decode(row[:n], skip_special=True) for row, n in zip(out.tokens.tolist(), out.lengths.tolist())]
