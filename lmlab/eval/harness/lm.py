"""One interface for in-context evaluation, implemented by every lmlab language model.

`LM` has lm-evaluation-harness's three request types, on plain strings:

- `loglikelihood([(context, continuation)])` -> [(log p(continuation | context), is_greedy)], where
  is_greedy says the continuation is what greedy decoding would produce token by token;
- `loglikelihood_rolling([text])` -> [log p(text)], every token scored (sliding windows when long);
- `generate_until([(context, GenArgs)])` -> [greedy continuation, cut before the first stop string].

Tokenizing a (context, continuation) pair follows lm-eval: trailing whitespace of the context moves
to the continuation, the two are encoded together and split where the encoding of the context alone
stops matching (the longest common prefix, which also handles word tokenizers that close each line
with `</s>`). Scoring runs padded batches of `batch_size` sequences, longest first; each row is right-
padded, which a causal model cannot see, so a row's scores do not depend on its batch. Generation
is the engine's one decoding loop (lmlab/generate/engine.py, greedy): the prompts of a batch decode
together with one KV cache, and rows leave the batch as they finish.

Speed (a 135M model on one CPU thread is ~0.5 s per 5-shot item otherwise): the output layer (49k
words for SmolLM2, a fifth of its FLOPs) runs only at the positions that are scored or decoded
(`logits_to_keep`), and requests that share a context -- the choices of a multiple-choice item -- run
that context once: the distinct contexts are prefilled left-padded into a KV cache, whose rows are
then copied to every continuation of their context, and the continuations are scored in one batch.
Left padding is masked, so scores agree with the right-padded path to float rounding (~1e-5).

Adapters: `TorchLM` for the neural families (GPT and Llama, also imported from GGUF or Hugging Face,
and the NPLM), `NGramLM` for count-based n-gram models (ngram_lm.py); `load_lm(path)` picks one.
"""

from __future__ import annotations

import contextlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import LmlabError
from lmlab.generate.engine import SamplingConfig, generate_texts


@dataclass(frozen=True)
class GenArgs:
    until: tuple[str, ...] = ()
    max_new_tokens: int = 32


class LM(ABC):
    name: str = "lm"
    params: int | None = None   # parameters, for plots against model size (None: not a neural model)

    @abstractmethod
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]: ...

    @abstractmethod
    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]: ...

    @abstractmethod
    def generate_until(self, requests: Sequence[tuple[str, GenArgs]]) -> list[str]: ...


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's convention: "Answer: " + "x" is scored as "Answer:" + " x"."""
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def cut_at_stop(text: str, until: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    cut = min((i for s in until if s and (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class TorchLM(LM):
    """A causal lmlab model (`model(input_ids).logits`) with its tokenizer.

    `prefix` goes before every text: the model's own BOS (`LoadedModel.bos`, lmlab/io/load.py; lmlab-
    trained models see `</s>` before each document, as in training and perplexity evaluation).
    `dtype=torch.bfloat16` runs the forward passes under autocast."""

    def __init__(self, model: nn.Module, tokenizer, *, prefix: Sequence[int] = (), batch_size: int = 16,
                 dtype: torch.dtype | None = None, name: str = "lm"):
        if getattr(model, "objective", "causal") != "causal":
            raise LmlabError(f"in-context evaluation needs a causal LM; '{model.config.family}' is not one")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.prefix, self.batch_size, self.dtype, self.name = list(prefix), max(1, batch_size), dtype, name
        self.block_size = model.config.block_size
        self.device = next(model.parameters()).device
        self.eos_id = tokenizer.eos_id
        self.params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        self.cached = hasattr(model, "make_kv_cache")
        self.trims_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    # -- tokens -------------------------------------------------------------------------------
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        context, continuation = split_pair(context, continuation)
        enc = self.tokenizer.encode
        ctx = self.prefix + (enc(context) if context else [])
        whole = self.prefix + enc(context + continuation)
        n = common_prefix(ctx, whole)
        ctx, cont = whole[:n], whole[n:]
        return (ctx or [self.eos_id]), cont

    def _autocast(self):
        if self.dtype is None or self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # -- scoring ------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, keep: int = 0, **kw) -> torch.Tensor:
        """Logits of the last `keep` positions (all when 0 or when the model cannot restrict them)."""
        if keep and self.trims_logits:
            kw["logits_to_keep"] = keep
        with self._autocast():
            logits = self.model(x.to(self.device), **kw).logits
        return logits[:, -keep:] if keep else logits

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests])

    def loglikelihood_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """`loglikelihood` of (context, continuation) pairs given as token ids (e.g. a chat prompt
        rendered with special tokens, and the assistant's reply); contexts are not prefixed."""
        if not self.cached:
            return self.score_tokens([(c + x, len(x)) for c, x in pairs])
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        shared, rest = [], []  # (index, context, continuation)
        for i, (c, x) in enumerate(pairs):
            if x:  # an empty continuation has log-likelihood 0 and is greedy
                (shared if len(c) + len(x) - 1 <= self.block_size else rest).append((i, c, x))
        for (i, _, _), r in zip(rest, self.score_tokens([(c + x, len(x)) for _, c, x in rest])):
            out[i] = r  # too long for the cache: the sliding window of score_tokens
        for i, r in self._score_shared(shared):
            out[i] = r
        return out

    def _context_batches(self, groups: dict[tuple[int, ...], list[tuple[int, list[int]]]]):
        """Batches of at most `batch_size` contexts, longest first (similar lengths share a batch: little
        padding), each short enough that its longest continuation still fits after its widest context."""
        batch: list[tuple[int, ...]] = []
        longest = 0
        for c in sorted(groups, key=len, reverse=True):
            need = max(len(x) for _, x in groups[c])
            full = len(batch) == self.batch_size
            if batch and (full or len(batch[0]) + max(longest, need) - 1 > self.block_size):
                yield batch
                batch, longest = [], 0
            batch.append(c)
            longest = max(longest, need)
        if batch:
            yield batch

    @torch.no_grad()
    def _score_shared(self, reqs: list[tuple[int, list[int], list[int]]]):
        """Yield (index, (log p, is_greedy)) of each continuation, running every distinct context once."""
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, c, x in reqs:
            groups.setdefault(tuple(c), []).append((i, x))
        for chunk in self._context_batches(groups):
            B, width = len(chunk), len(chunk[0])
            x = torch.full((B, width), self.eos_id, dtype=torch.long)
            mask = torch.zeros(B, width, dtype=torch.long)
            for r, c in enumerate(chunk):
                x[r, width - len(c):], mask[r, width - len(c):] = torch.tensor(c), 1
            rows = [(r, i, cont) for r, c in enumerate(chunk) for i, cont in groups[c]]
            longest = max(len(cont) for _, _, cont in rows)
            cache = self.model.make_kv_cache(B, width)
            # the last context position predicts each continuation's first token
            first = F.log_softmax(self._forward(x, 1, kv_cache=cache, attention_mask=mask.to(self.device))[:, 0]
                                  .float(), dim=-1)
            rest = None
            if longest > 1:  # the other tokens: every continuation after a copy of its context's cache
                xs = torch.full((len(rows), longest - 1), self.eos_id, dtype=torch.long)
                xmask = torch.zeros(len(rows), longest - 1, dtype=torch.long)
                for j, (_, _, cont) in enumerate(rows):
                    xs[j, :len(cont) - 1], xmask[j, :len(cont) - 1] = torch.tensor(cont[:-1]), 1
                cache.keep([r for r, _, _ in rows], extra=longest - 1)  # a copy per continuation
                rest = F.log_softmax(self._forward(xs, 0, kv_cache=cache, attention_mask=xmask.to(self.device))
                                     .float(), dim=-1)
            for j, (r, i, cont) in enumerate(rows):
                lp = first[r:r + 1] if rest is None else torch.cat([first[r:r + 1], rest[j, :len(cont) - 1]])
                target = torch.tensor(cont, device=lp.device)
                yield i, (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))

    @torch.no_grad()
    def score_tokens(self, seqs: Sequence[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(sum of log p, all greedy) of the last n tokens of each sequence given the ones before."""
        out: list[tuple[float, bool]] = [(0.0, True)] * len(seqs)
        rows = []
        for i, (ids, n) in enumerate(seqs):
            if n == 0:
                continue
            if n > self.block_size:
                raise LmlabError(f"a continuation of {n} tokens does not fit the model's {self.block_size}")
            rows.append((i, ids[-(self.block_size + 1):], n))  # keep the end: the continuation
        rows.sort(key=lambda r: -len(r[1]))  # longest first: similar lengths share a batch
        for lo in range(0, len(rows), self.batch_size):
            chunk = rows[lo:lo + self.batch_size]
            width = max(len(ids) - 1 for _, ids, _ in chunk)
            x = torch.full((len(chunk), width), self.eos_id, dtype=torch.long)
            for r, (_, ids, _) in enumerate(chunk):
                x[r, :len(ids) - 1] = torch.tensor(ids[:-1])
            # logits at positions end - n .. end - 1 (end = len(ids) - 1) predict a row's continuation:
            # the output layer needs to run from the earliest of those in the batch only
            keep = width - min(len(ids) - 1 - n for _, ids, n in chunk)
            logits = self._forward(x, keep)
            for r, (i, ids, n) in enumerate(chunk):
                end = len(ids) - 1 - (width - keep)
                lp = F.log_softmax(logits[r, end - n:end].float(), dim=-1)
                target = torch.tensor(ids[-n:], device=lp.device)
                out[i] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
        return out

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        from lmlab.eval.perplexity import token_nll

        out = []
        for text in texts:
            ids = self.prefix + self.tokenizer.encode(text)
            first, ids = (ids[0], ids[1:]) if self.prefix else (self.eos_id, ids)
            nll = token_nll(self.model, np.array(ids, dtype=np.int64), bos=first, block_size=self.block_size,
                            batch_size=self.batch_size, device=self.device, autocast_dtype=self.dtype)
            out.append(-float(nll.sum()))
        return out

    # -- generation ---------------------------------------------------------------------------
    def generate_until(self, requests: Sequence[tuple[str, GenArgs]]) -> list[str]:
        out = [""] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: (repr(requests[i][1]), -len(requests[i][0])))
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo:lo + self.batch_size]
            # one batch shares its generation settings: split it where they change
            groups: dict[GenArgs, list[int]] = {}
            for i in idx:
                groups.setdefault(requests[i][1], []).append(i)
            for args, members in groups.items():
                texts = self._greedy([self.prefix + self.tokenizer.encode(requests[i][0]) for i in members], args)
                for i, t in zip(members, texts):
                    out[i] = t
        return out

    def _greedy(self, prompts: list[list[int]], args: GenArgs) -> list[str]:
        """Greedy continuations of `prompts`, decoded together by the engine's loop (lmlab/generate/engine.py)."""
        keep = self.block_size - args.max_new_tokens
        if keep < 1:
            raise LmlabError(f"max_new_tokens {args.max_new_tokens} leaves no room in block_size {self.block_size}")
        prompts = [(p or [self.eos_id])[-keep:] for p in prompts]
        cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0, stop=list(args.until))
        with self._autocast():
            return generate_texts(self.model, self.tokenizer, prompts, cfg)


def load_lm(path: str | Path, *, batch_size: int = 16, dtype: torch.dtype | None = None,
            device: str = "cpu") -> LM:
    """An `LM` for any model `lmlab.io.load.load_model` opens (GGUF, ARPA, Hugging Face directory, lmlab
    run/checkpoint), at full precision (`dtype` runs the forward passes under autocast), with the
    model's own BOS before every text (`LoadedModel.bos`)."""
    from lmlab.io.load import load_model, model_kind

    p = Path(path)
    # a GGUF file on the CPU in its blocks as stored (fp32 arithmetic: logits within ~1e-4 of its fp32
    # dequantization, ~1.6x faster, docs/gguf/README.md); anything else in float32
    blocks = device == "cpu" and model_kind(p) == "gguf"
    loaded = load_model(p, device=device, precision="gguf" if blocks else "fp32")
    if loaded.kind == "arpa":
        from lmlab.eval.harness.ngram_lm import NGramLM

        return NGramLM(loaded.model, name=p.name)
    if loaded.tokenizer is None:
        raise LmlabError(f"{p} has no tokenizer.json; in-context evaluation needs the tokenizer")
    return TorchLM(loaded.model, loaded.tokenizer, prefix=loaded.bos, batch_size=batch_size, dtype=dtype,
                   name=p.name)
