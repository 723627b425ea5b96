"""Encoder-decoder generation (BART): greedy, sampling and beam search.

The encoder runs once per input, and every decoder layer's cross-attention keys/values are computed
once (`model.cross_kv`); the decoder's self-attention continues step by step from a KVCache. Outputs
are laid out as `transformers.generate` lays out an encoder-decoder's: [B, 1 + n], the decoder start
token first, each row padded with <pad> after its </s>.

Beam search keeps, per input, `num_beams` running hypotheses and a list of the `num_beams` best
finished ones, scored as sum(log p) / length ** length_penalty (length = generated tokens, </s>
included). Each step looks at the 2 * num_beams best continuations, so that at least num_beams of them
do not end and the beam stays full; a continuation ending in </s> joins the finished list only if it
ranks among the first num_beams. An input is done once its list is full and (with `early_stopping`)
at once, or (without) when its best running hypothesis, scored at its current length, can no longer
beat the worst finished one. These are the rules of `transformers`' beam search (the tests compare
token for token), which follow the fairseq/tensor2tensor tradition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.nn.sampling import sample
from lmlab.tokenizers import Tokenizer

NEG = -1.0e9  # the score of a hypothesis that must not be chosen (finite, so sums stay ordered)


@dataclass(kw_only=True)
class Seq2SeqConfig:
    max_new_tokens: int = 64
    num_beams: int = 1            # 1: greedy or sampling
    length_penalty: float = 1.0   # beam score = sum log p / length ** length_penalty
    early_stopping: bool = False  # beam search stops an input as soon as num_beams hypotheses finished
    temperature: float = 0.0      # 0: greedy; > 0 samples (num_beams = 1 only)
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


def _prepare(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, copies: int):
    """Encoder output -> cross-attention keys/values (once), each row repeated `copies` times."""
    cross = model.cross_kv(model.encode(input_ids, attention_mask))
    if copies > 1:
        cross = [(k.repeat_interleave(copies, 0), v.repeat_interleave(copies, 0)) for k, v in cross]
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(copies, 0)
    return cross, attention_mask


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, cfg: Seq2SeqConfig,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Token ids [B, 1 + n] for a batch of encoder inputs ([B, S], right-padded with `attention_mask`)."""
    if cfg.num_beams > 1:
        if cfg.temperature > 0:
            raise ValueError("beam search is deterministic here: use temperature 0 with num_beams > 1")
        return beam_search(model, input_ids, cfg, attention_mask)
    c = model.config
    model.eval()
    B, dev = input_ids.shape[0], input_ids.device
    steps = min(cfg.max_new_tokens, c.block_size)  # decoder positions 0 .. steps-1
    gen = None
    if cfg.temperature > 0:  # a generator of its own: sampling leaves the global RNG alone
        gen = torch.Generator(device=dev)
        gen.manual_seed(cfg.seed) if cfg.seed is not None else gen.seed()
    cross, mask = _prepare(model, input_ids, attention_mask, 1)
    cache = model.make_kv_cache(B, max(steps, 1))
    out = torch.full((B, 1), c.decoder_start_id, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    for _ in range(steps):
        logits = model.decode(out[:, -1:], cross, attention_mask=mask, kv_cache=cache)[:, -1]
        nxt = sample(logits, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=gen)
        nxt = nxt.masked_fill(done, c.pad_id)
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= nxt == c.eos_id
        if bool(done.all()):
            break
    return out


@torch.no_grad()
def beam_search(model: nn.Module, input_ids: torch.Tensor, cfg: Seq2SeqConfig,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The best finished hypothesis per input, [B, 1 + n] (see the module docstring for the rules)."""
    c = model.config
    model.eval()
    B, K, dev = input_ids.shape[0], cfg.num_beams, input_ids.device
    steps = min(cfg.max_new_tokens, c.block_size)
    total = 1 + steps  # the longest hypothesis, start token included
    cross, mask = _prepare(model, input_ids, attention_mask, K)
    cache = model.make_kv_cache(B * K, max(steps, 1))
    seqs = torch.full((B, K, total), c.pad_id, dtype=torch.long, device=dev)
    seqs[:, :, 0] = c.decoder_start_id
    # only beam 0 is live at first, so the K beams do not all pick the same first tokens
    scores = torch.full((B, K), NEG, device=dev)
    scores[:, 0] = 0.0
    fin_seqs, fin_scores = seqs.clone(), torch.full((B, K), NEG, device=dev)
    fin_len = torch.zeros(B, K, dtype=torch.long, device=dev)
    fin_done = torch.zeros(B, K, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, dtype=torch.bool, device=dev)  # may a new hypothesis still join the list?
    n_cand = 2 * K
    in_top_k = torch.arange(n_cand, device=dev) < K
    rows = (torch.arange(B, device=dev) * K)[:, None]
    for cur in range(1, total):  # `cur` tokens in each running hypothesis; this step adds one
        logits = model.decode(seqs[:, :, cur - 1].reshape(B * K, 1), cross, attention_mask=mask, kv_cache=cache)
        logp = F.log_softmax(logits[:, -1].float(), dim=-1)
        V = logp.shape[-1]
        cand_scores, flat = (logp.view(B, K, V) + scores[..., None]).view(B, K * V).topk(n_cand, dim=-1)
        beam, tok = flat // V, flat % V
        cand = seqs.gather(1, beam[..., None].expand(-1, -1, total)).clone()
        cand[:, :, cur] = tok
        ends = (tok == c.eos_id) | (cur + 1 >= total)

        # finished candidates (ranked within the first K) join the list, scored with the length penalty
        joins = ends & in_top_k & improvable[:, None]
        if cfg.early_stopping:
            joins &= ~fin_done.all(dim=1, keepdim=True)
        normed = torch.where(joins, cand_scores / cur ** cfg.length_penalty, NEG)
        merged = torch.cat([fin_scores, normed], dim=1).topk(K, dim=1)
        pick = merged.indices
        fin_scores = merged.values
        fin_seqs = torch.cat([fin_seqs, cand], dim=1).gather(1, pick[..., None].expand(-1, -1, total))
        fin_len = torch.cat([fin_len, torch.full_like(tok, cur)], dim=1).gather(1, pick)
        fin_done = torch.cat([fin_done, joins], dim=1).gather(1, pick)

        # the K best candidates that did not end run on; their caches follow them
        keep = (cand_scores + ends.float() * NEG).topk(K, dim=1)
        scores = keep.values
        seqs = cand.gather(1, keep.indices[..., None].expand(-1, -1, total))
        cache.reorder((rows + beam.gather(1, keep.indices)).view(-1))

        best_possible = scores[:, 0] / cur ** cfg.length_penalty
        improvable &= ~fin_done.all(dim=1) | (best_possible > fin_scores.min(dim=1).values)
        if not bool(improvable.any()) or (cfg.early_stopping and bool(fin_done.all())):
            break
    n = int(fin_len[:, 0].max())
    return fin_seqs[:, 0, :1 + n]


def encode_sources(tok: Tokenizer, sources: list[str], block_size: int,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded encoder inputs and their attention mask; each source ends with </s> (as in BART)."""
    rows = []
    for text in sources:
        ids = tok.encode(text)
        while ids and ids[-1] == tok.eos_id:  # word tokenizers close every line with </s>
            ids.pop()
        rows.append(ids[:block_size - 1] + [tok.eos_id])
    S = max(len(r) for r in rows)
    x = torch.full((len(rows), S), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return x.to(device), mask.to(device)


def decode_outputs(tok: Tokenizer, out: torch.Tensor) -> list[str]:
    """Texts of generated rows ([B, 1 + n]): the start token dropped, cut at the first </s>."""
    texts = []
    for row in out[:, 1:].tolist():
        if tok.eos_id in row:
            row = row[:row.index(tok.eos_id)]
        texts.append(tok.decode(row, skip_special=True))
    return texts


def generate_text(model: nn.Module, tok: Tokenizer, sources: list[str], cfg: Seq2SeqConfig) -> list[str]:
    device = next(model.parameters()).device
    x, mask = encode_sources(tok, sources, model.config.block_size, device)
    return decode_outputs(tok, generate(model, x, cfg, attention_mask=mask))


def greedy_generate(model: nn.Module, input_ids: torch.Tensor, *, max_new_tokens: int,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy decoding ([B, 1 + n]: the start token, then the tokens)."""
    return generate(model, input_ids, Seq2SeqConfig(max_new_tokens=max_new_tokens), attention_mask=attention_mask)
