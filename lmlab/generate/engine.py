"""The one causal decoding loop: generate, chat and the harness's `generate_until` all run here.

`Decoder` decodes a batch of requests (prompts of different lengths, each with its own
`SamplingConfig`): it prefills the prompts once into a KV cache (left-padded; lmlab/nn/kv_cache.py
keeps a length and a position per row), then feeds one new token per row and step. A row leaves the
batch when it samples EOS, reaches its `max_new_tokens` or its caller ends it (a stop string), so one
row rambling on does not keep the others decoding. Every request samples from its own random
generator (seeded by its `seed`), so its tokens do not depend on what else is in the batch.

Conditioning inputs (`inputs`, e.g. an image captioner's `pixel_values`, one row per request) go to
the model with each request's prompt whenever it is prefilled; the model puts them before the prompt
in the cache (its `n_prefix_tokens` positions), and the decoding steps that follow are the ordinary ones.

Without a cache (`use_cache=False`, or a model without one such as the NPLM) each row recomputes its
window every step. One request alone (B = 1) slides past the model's context by re-prefilling the
last half of it, and quantized Llama-style models take the lean step of lmlab/generate/fast_decode.py.

Text: `Detokenizer` turns each row's new tokens into text incrementally, decoding O(1) tokens per
step (the prefix/read-offset scheme of Hugging Face's TextStreamer and vLLM's detokenizer: decode a
small window that starts a token or two back, emit what it adds, hold back an incomplete UTF-8
character), and checks stop strings on the text not yet emitted (at most the longest stop string
minus one character is held back). `stream_text` is the streaming face for one request,
`stream_batch` / `generate_texts` for many.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
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
    seed: int | None = None      # this request's own generator (None: a fresh random seed)
    stop: list[str] = field(default_factory=list)


class Decoder:
    """Token-level decoding of a batch of requests; see the module docstring.

    `step()` returns the (request index, new token) of every row still decoding; a row whose token was
    EOS or its last is then in `leaving` and leaves before the next step, as does a row passed to
    `finish(i)`."""

    def __init__(self, model: nn.Module, prompts: Sequence[Sequence[int]],
                 cfgs: SamplingConfig | Sequence[SamplingConfig], *, eos_id: int | None = None,
                 use_cache: bool = True, inputs: dict[str, torch.Tensor] | None = None):
        cfgs = [cfgs] * len(prompts) if isinstance(cfgs, SamplingConfig) else list(cfgs)
        self.inputs = inputs or {}
        if any(len(v) != len(prompts) for v in self.inputs.values()):
            raise ValueError(f"conditioning inputs need one row per prompt ({len(prompts)})")
        # cache positions the conditioning inputs take before the prompt (an image's patch tokens)
        self.n_prefix = getattr(model, "n_prefix_tokens", 0) if self.inputs else 0
        if len(cfgs) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(cfgs)} sampling configs")
        if any(not p for p in prompts):
            raise ValueError("the prompt must hold at least one token (e.g. the tokenizer's </s>)")
        self.model, self.cfgs, self.eos_id = model.eval(), cfgs, eos_id
        self.block = model.config.block_size
        self.cached = use_cache and hasattr(model, "make_kv_cache")  # e.g. the NPLM has no cache
        if hasattr(model, "make_kv_cache") and (n := max(len(p) for p in prompts)) > self.block:
            raise LmlabError(f"the prompt has {n} tokens, more than the model's context of {self.block} "
                             "tokens; shorten it")
        self.device = next(model.parameters()).device
        self.gens = []
        for c in cfgs:
            g = torch.Generator(device=self.device)
            g.manual_seed(c.seed if c.seed is not None else torch.seed())
            self.gens.append(g)
        self.ids = [list(p) for p in prompts]               # prompt + new tokens, per request
        self.n_new = [0] * len(prompts)
        self.rows = [i for i, c in enumerate(cfgs) if c.max_new_tokens > 0]  # request of each live row
        self.leaving: set[int] = set()
        self.cache = self.fast = self.last = None
        self.capacity = 0

    @property
    def done(self) -> bool:
        return not [i for i in self.rows if i not in self.leaving]

    def finish(self, i: int) -> None:
        """Request `i` leaves the batch (e.g. its text reached a stop string)."""
        self.leaving.add(i)

    # -- forward passes ---------------------------------------------------------------------------
    def _prefill(self, contexts: list[list[int]]) -> torch.Tensor:
        """Fill a new cache with `contexts` (left-padded); logits [B, V] of each one's last position."""
        B, width = len(contexts), max(len(c) for c in contexts)
        if B == 1:
            need = max(len(self.ids[self.rows[0]]), width) + self.cfgs[self.rows[0]].max_new_tokens \
                - self.n_new[self.rows[0]]
        else:
            need = width + max(self.cfgs[i].max_new_tokens for i in self.rows)
            if need > self.block:
                raise LmlabError(f"a batch of prompts of up to {width} tokens and {need - width} new tokens "
                                 f"does not fit the model's context of {self.block}")
        # the cache holds what this call can reach, not the whole context (8192 positions for SmolLM2)
        self.capacity = min(self.block, need)
        x = torch.full((B, width), self.eos_id or 0, dtype=torch.long)  # pads: masked out
        mask = torch.zeros(B, width, dtype=torch.bool)
        for r, c in enumerate(contexts):
            x[r, width - len(c):], mask[r, width - len(c):] = torch.tensor(c), True
        self.cache = self.model.make_kv_cache(B, self.capacity)
        kw = {"attention_mask": mask.to(self.device)} if not bool(mask.all()) else {}
        kw |= self._inputs(self.rows)
        logits = self.model(x.to(self.device), kv_cache=self.cache, logits_to_keep=1, **kw).logits[:, -1]
        self.fast = FastDecoder.build(self.model, self.cache) if B == 1 else None  # quantized Llama-style
        return logits

    def _inputs(self, rows: list[int]) -> dict[str, torch.Tensor]:
        return {k: v[rows].to(self.device) for k, v in self.inputs.items()}

    def _logits(self) -> torch.Tensor:
        if not self.cached:  # recompute each row's window
            return torch.cat([self.model(torch.tensor([self.ids[i][-self.block:]], device=self.device),
                                         **self._inputs([i])).logits[:, -1] for i in self.rows])
        if self.cache is None:
            return self._prefill([self.ids[i] for i in self.rows])
        if len(self.rows) == 1 and self.cache.pos - self.n_prefix >= self.capacity:
            # one request past the window: re-prefill the last half of it
            return self._prefill([self.ids[self.rows[0]][-(self.block // 2):]])
        if self.fast is not None:
            return self.fast.step(self.last)
        return self.model(self.last.view(-1, 1), kv_cache=self.cache).logits[:, -1]

    # -- one step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[tuple[int, int]]:
        """One new token for every live row: [(request index, token)]."""
        if self.leaving:
            keep = [j for j, i in enumerate(self.rows) if i not in self.leaving]
            if self.cache is not None and len(keep) < len(self.rows):
                if keep:
                    self.cache.keep(keep)
                    self.last = self.last[keep]
                self.fast = None if len(keep) != 1 or self.fast is None else self.fast
            self.rows = [self.rows[j] for j in keep]
            self.leaving.clear()
        if not self.rows:
            return []
        logits = self._logits()
        with self.fast.quiet_torch() if self.fast is not None else contextlib.nullcontext():
            return self._pick(logits)

    def _pick(self, logits: torch.Tensor) -> list[tuple[int, int]]:
        toks = []
        greedy = [j for j, i in enumerate(self.rows) if self.cfgs[i].temperature <= 0]
        picked = torch.empty(len(self.rows), dtype=torch.long, device=logits.device)
        if greedy:
            picked[greedy] = logits[greedy].argmax(-1)
        for j, i in enumerate(self.rows):
            c = self.cfgs[i]
            if c.temperature > 0:
                picked[j] = sample(logits[j:j + 1], temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                                   generator=self.gens[i])[0]
        self.last = picked
        for i, t in zip(self.rows, picked.tolist()):  # the one host sync of a step
            self.ids[i].append(t)
            self.n_new[i] += 1
            toks.append((i, t))
            if t == self.eos_id or self.n_new[i] >= self.cfgs[i].max_new_tokens:
                self.leaving.add(i)
        return toks


@torch.no_grad()
def generate_ids(model: nn.Module, prompt: list[int], cfg: SamplingConfig, *, eos_id: int | None = None,
                 use_cache: bool = True, inputs: dict[str, torch.Tensor] | None = None) -> Iterator[int]:
    """Yield new token ids one at a time (the EOS token, if sampled, is the last)."""
    dec = Decoder(model, [prompt], cfg, eos_id=eos_id, use_cache=use_cache, inputs=inputs)
    while not dec.done:
        for _, t in dec.step():
            yield t


class Detokenizer:
    """One sequence's new tokens -> text, incrementally, with stop strings (see the module docstring).

    `push(token)` returns the text it makes printable ("" while a character is incomplete or text may
    start a stop string); once `stopped`, the text is complete (cut before the stop string). `flush()`
    returns the rest at the end. The concatenated pieces equal `decode(tokens)` cut at the first stop."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), *, skip_special: bool = True):
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # text that may start a stop string
        self.tokens: list[int] = []
        self.prefix = self.read = 0   # decode window: tokens[prefix:read] were already turned into text
        self.pending = ""             # decoded but not yet emitted
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=self.skip_special) if ids else ""

    def _delta(self, final: bool = False) -> str:
        before = self._decode(self.tokens[self.prefix:self.read])
        text = self._decode(self.tokens[self.prefix:])
        if final or (len(text) > len(before) and not text.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.tokens)
            return text[len(before):]
        return ""

    def _emit(self, delta: str, final: bool = False) -> str:
        text = self.pending + delta
        cut = min((i for s in self.stop if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.pending = True, ""
            return text[:cut]
        safe = len(text) if final else max(0, len(text) - self.hold)
        self.pending = text[safe:]
        return text[:safe]

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        delta = self._delta()
        return self._emit(delta) if delta else ""

    def flush(self) -> str:
        if self.stopped:
            return ""
        return self._emit(self._delta(final=True), final=True)


def stream_batch(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]],
                 cfgs: SamplingConfig | Sequence[SamplingConfig], *, use_cache: bool = True,
                 inputs: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[int, str]]:
    """Yield (request index, text piece) as each request's text becomes printable; a request ends at
    EOS (not part of the text), `max_new_tokens` or a stop string (the text is cut before it).
    `inputs`: conditioning tensors, one row per prompt (see the module docstring)."""
    dec = Decoder(model, prompts, cfgs, eos_id=tokenizer.eos_id, use_cache=use_cache, inputs=inputs)
    detok = [Detokenizer(tokenizer, c.stop) for c in dec.cfgs]
    while not dec.done:
        for i, t in dec.step():
            if t == tokenizer.eos_id:
                piece = detok[i].flush()
            else:
                piece = detok[i].push(t)
                if detok[i].stopped:
                    dec.finish(i)
                elif i in dec.leaving:  # its last token
                    piece += detok[i].flush()
            if piece:
                yield i, piece


def generate_texts(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]],
                   cfgs: SamplingConfig | Sequence[SamplingConfig], *, use_cache: bool = True,
                   inputs: dict[str, torch.Tensor] | None = None) -> list[str]:
    """The finished text of every request (see `stream_batch`)."""
    out = [""] * len(prompts)
    pieces: list[list[str]] = [[] for _ in prompts]
    for i, piece in stream_batch(model, tokenizer, prompts, cfgs, use_cache=use_cache, inputs=inputs):
        pieces[i].append(piece)
    for i, p in enumerate(pieces):
        out[i] = "".join(p)
    return out


def prompt_ids(tokenizer: Tokenizer, prompt: str | Sequence[int], bos: Sequence[int] = ()) -> list[int]:
    """A text prompt encoded after `bos` (the model's own, `LoadedModel.bos`); token ids as they are.
    An empty prompt starts a new document: the BOS, or without one the end-of-text token."""
    if isinstance(prompt, str):
        ids = list(bos) + (tokenizer.encode(prompt) if prompt else [])
    else:
        ids = list(prompt)
    return ids or [tokenizer.eos_id]


def stream_text(model: nn.Module, tokenizer: Tokenizer, prompt: str | list[int], cfg: SamplingConfig, *,
                use_cache: bool = True, bos: Sequence[int] = (), inputs: dict[str, torch.Tensor] | None = None
                ) -> Iterator[str]:
    """Yield pieces of generated text as they become printable, honouring stop strings. `prompt` is
    text (encoded after `bos`), or token ids already encoded (e.g. a chat template's, with its special
    tokens), taken as they are. `inputs`: conditioning tensors with one row (e.g. an image)."""
    for _, piece in stream_batch(model, tokenizer, [prompt_ids(tokenizer, prompt, bos)], cfg, use_cache=use_cache,
                                 inputs=inputs):
        yield piece


def generate_text(model: nn.Module, tokenizer: Tokenizer, prompt: str | list[int], cfg: SamplingConfig,
                  **kw) -> str:
    return "".join(stream_text(model, tokenizer, prompt, cfg, **kw))
