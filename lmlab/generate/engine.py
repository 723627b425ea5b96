"""Autoregressive decoding: prefill the prompt once, then feed one new token per step.

With the KV cache each step costs O(context); without it (`use_cache=False`, for testing and for
models without a cache) the whole window is recomputed. Stop conditions: `max_new_tokens`, the EOS
token, or a stop string in the decoded text (which is cut before the stop string).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.generate.fast_decode import FastDecoder
from lmlab.nn.sampling import sample
from lmlab.tokenizers import Tokenizer


@dataclass(kw_only=True)
class SamplingConfig:
    max_new_tokens: int = 200
    temperature: float = 0.8     # 0: greedy
    top_k: int = 0               # 0: off
    top_p: float = 1.0           # 1: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@torch.no_grad()
def generate_ids(model: nn.Module, prompt: list[int], cfg: SamplingConfig, *, eos_id: int | None = None,
                 use_cache: bool = True) -> Iterator[int]:
    """Yield new token ids one at a time."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token (e.g. the tokenizer's </s>)")
    block = model.config.block_size
    has_cache = hasattr(model, "make_kv_cache")  # a Transformer decoder; e.g. the NPLM has no cache
    if has_cache and len(prompt) > block:
        raise LmlabError(f"the prompt has {len(prompt)} tokens, more than the model's context of {block} "
                         "tokens; shorten it")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    model.eval()
    use_cache = use_cache and has_cache
    # the cache holds what this call can reach, not the whole context (8192 positions for SmolLM2)
    capacity = min(block, len(prompt) + cfg.max_new_tokens)
    ids = list(prompt)
    cache = fast = nxt_t = None
    for _ in range(cfg.max_new_tokens):
        if use_cache and (cache is None or cache.pos >= capacity):
            # (re)fill: first the prompt, or, once the window is full, the last half of it
            context = ids if cache is None else ids[-(block // 2):]
            cache = model.make_kv_cache(1, capacity)
            logits = model(torch.tensor([context], device=device), kv_cache=cache, logits_to_keep=1).logits[:, -1]
            fast = FastDecoder.build(model, cache)  # quantized Llama-style models: fewer ops per token
        elif fast is not None:
            logits = fast.step(nxt_t)
        elif use_cache:
            logits = model(nxt_t.view(1, 1), kv_cache=cache).logits[:, -1]
        else:
            logits = model(torch.tensor([ids[-block:]], device=device)).logits[:, -1]
        nxt_t = sample(logits, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=gen)
        nxt = int(nxt_t[0])  # the one host sync of a step
        ids.append(nxt)
        yield nxt
        if eos_id is not None and nxt == eos_id:
            return


def stream_text(model: nn.Module, tokenizer: Tokenizer, prompt: str | list[int], cfg: SamplingConfig, *,
                use_cache: bool = True) -> Iterator[str]:
    """Yield pieces of generated text as they become printable, honouring stop strings. `prompt` is
    text, or token ids already encoded (e.g. a chat template's, with its special tokens)."""
    prompt_ids = list(prompt) if isinstance(prompt, list) else tokenizer.encode(prompt) if prompt else []
    if not prompt_ids:
        prompt_ids = [tokenizer.eos_id]  # an empty prompt starts a new document
    new: list[int] = []
    emitted = ""
    hold = max((len(s) for s in cfg.stop), default=1) - 1  # keep back text that may start a stop string
    for tok in generate_ids(model, prompt_ids, cfg, eos_id=tokenizer.eos_id, use_cache=use_cache):
        if tok == tokenizer.eos_id:
            break
        new.append(tok)
        text = tokenizer.decode(new, skip_special=True)
        cut = min((i for s in cfg.stop if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            if cut > len(emitted):
                yield text[len(emitted):cut]
            return
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next byte
            continue
        safe = len(text) - hold if cfg.stop else len(text)
        if safe > len(emitted):
            yield text[len(emitted):safe]
            emitted = text[:safe]
    text = tokenizer.decode(new, skip_special=True)
    if len(text) > len(emitted):
        yield text[len(emitted):]


def generate_text(model: nn.Module, tokenizer: Tokenizer, prompt: str, cfg: SamplingConfig, **kw) -> str:
    return "".join(stream_text(model, tokenizer, prompt, cfg, **kw))
