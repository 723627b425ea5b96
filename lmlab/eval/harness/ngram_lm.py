"""The in-context `LM` interface (lm.py) for count-based n-gram models (lmlab/models/ngram/model.py).

Text is read the way the n-gram model was trained (KenLM's convention): whitespace-separated words,
each non-empty line a sentence that starts after `<s>` and ends with `</s>`. So an n-gram model sees
only the current line of a prompt: demonstrations on earlier lines cannot help it, which is what its
k-shot rows measure. A continuation is scored with the `</s>` that closes its line, and generation
emits words (never `<unk>`) until `</s>`, which is a newline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lmlab.eval.harness.lm import LM, GenArgs, common_prefix, cut_at_stop, split_pair
from lmlab.models.ngram.count import BOS, EOS, UNK
from lmlab.models.ngram.model import NGramModel

LN10 = math.log(10.0)


class NGramLM(LM):
    def __init__(self, model: NGramModel, *, name: str = "ngram"):
        self.model, self.name = model, name
        self.params = None

    def _sentences(self, text: str) -> list[list[int]]:
        """Internal word ids of each non-empty line (without `</s>`)."""
        return [list(self.model.encode(line)) for line in text.splitlines() if line.split()]

    def _stream(self, text: str) -> list[int]:
        return [w for s in self._sentences(text) for w in s + [EOS]]

    def _token_scores(self, text: str) -> np.ndarray:
        """ln p of every word and `</s>` of `text`, each line scored from `<s>`."""
        scores = [p for line in text.splitlines() if line.split() for p, _, _ in self.model.full_scores(line)]
        return np.array(scores, dtype=np.float64) * LN10

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        out = []
        for context, continuation in requests:
            context, continuation = split_pair(context, continuation)
            whole = self._stream(context + continuation)
            n = common_prefix(self._stream(context), whole)
            scores = self._token_scores(context + continuation)
            greedy, start = True, 0
            for i in range(n, len(whole)):  # the words of the continuation, in their sentences
                start = max((j + 1 for j in range(i) if whole[j] == EOS), default=0)
                lp = self.model.next_logprobs([BOS] + whole[start:i])
                if int(np.argmax(lp)) != whole[i]:
                    greedy = False
                    break
            out.append((float(scores[n:].sum()), greedy))
        return out

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        return [float(self._token_scores(t).sum()) for t in texts]

    def generate_until(self, requests: Sequence[tuple[str, GenArgs]]) -> list[str]:
        out = []
        for context, args in requests:
            last = context.split("\n")[-1]
            ctx = [BOS] + list(self.model.encode(last))
            text = ""
            for _ in range(args.max_new_tokens):
                lp = self.model.next_logprobs(ctx)
                lp[UNK] = -np.inf
                w = int(np.argmax(lp))
                if not np.isfinite(lp[w]):
                    break
                if w == EOS:
                    text, ctx = text + "\n", [BOS]
                else:
                    text += (" " if len(ctx) > 1 else "") + self.model.vocab[w]
                    ctx.append(w)
                if cut_at_stop(text, args.until)[1]:
                    break
            out.append(cut_at_stop(text, args.until)[0])
        return out
