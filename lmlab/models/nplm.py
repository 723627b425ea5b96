"""Bengio et al. (2003)'s neural probabilistic language model: a feed-forward n-gram model.

The previous n - 1 tokens are looked up in a shared embedding table C and concatenated into
x = (C(w_{t-1}), ..., C(w_{t-n+1})); then y = b + W x + U tanh(d + H x) (their eq. 1), where W are the
optional direct input-to-output connections. With `tie_embeddings` the output layer reuses C
through a linear hidden -> m projection, y = b + C P tanh(d + H x) (Press & Wolf 2017's weight tying,
which regularises small corpora such as PTB and makes the output layer m rather than h wide). The
first tokens of a window see `</s>` as context (documents are separated by `</s>` in lmlab's token
streams). Trained by the common Trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.models.base import LMOutput, ModelConfig, count_params, init_normal
from lmlab.nn.loss import linear_cross_entropy


@dataclass(kw_only=True)
class NPLMConfig(ModelConfig):
    family: str = "nplm"
    context: int = 4          # n - 1 previous tokens (Bengio et al. used n = 5 or 6 on AP News)
    n_embd: int = 64          # m, the feature vector of a word
    hidden: int = 256         # h, the tanh hidden layer
    direct: bool = True       # the direct connections W from the features to the output
    tie_embeddings: bool = False  # output layer = C, reached through a hidden -> n_embd projection P
    dropout: float = 0.0
    init_std: float = 0.02
    pad_id: int = 3           # the context before a stream's first token (lmlab's </s>)
    loss_chunk_size: int = 512  # positions per chunk of the training loss; 0 = plain logits + cross-entropy


class NPLM(nn.Module):
    config_class = NPLMConfig

    def __init__(self, config: NPLMConfig):
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("NPLMConfig.vocab_size must be set (it comes from the tokenizer)")
        if config.context < 1:
            raise ValueError("NPLMConfig.context must be at least 1")
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)                # C
        features = c.context * c.n_embd
        self.hidden = nn.Linear(features, c.hidden)                     # H, d
        self.proj = nn.Linear(c.hidden, c.n_embd, bias=False) if c.tie_embeddings else None  # P
        self.out = nn.Linear(c.n_embd if c.tie_embeddings else c.hidden, c.vocab_size)  # U, b
        self.direct = nn.Linear(features, c.vocab_size, bias=False) if c.direct else None  # W
        self.drop = nn.Dropout(c.dropout)
        init_normal(self, c.init_std)
        if c.tie_embeddings:
            self.out.weight = self.wte.weight

    def num_params(self, non_embedding: bool = True) -> int:
        return count_params(self, non_embedding, (self.wte,))

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, **_) -> LMOutput:
        B, T = input_ids.shape
        n1 = self.config.context
        # window t holds tokens t - n1 + 1 .. t, i.e. the context of the token that follows t
        padded = F.pad(input_ids, (n1 - 1, 0), value=self.config.pad_id)
        windows = padded.unfold(1, n1, 1)                               # [B, T, n1]
        x = self.drop(self.wte(windows).flatten(2))                     # [B, T, n1 * m]
        h = self.drop(torch.tanh(self.hidden(x)))
        if self.proj is not None:
            h = self.proj(h)
        if targets is not None and self.config.loss_chunk_size > 0:
            # training: y = [U W b] [h; x; 1], so the chunked output-layer loss (lmlab/nn/loss.py) applies
            # and the [B*T, V] logits are never materialised
            feats = [h] + ([x] if self.direct is not None else []) + [h.new_ones(B, T, 1)]
            weight = [self.out.weight] + ([self.direct.weight] if self.direct is not None else []) \
                + [self.out.bias[:, None]]
            loss = linear_cross_entropy(torch.cat(feats, -1).reshape(B * T, -1), torch.cat(weight, 1),
                                        targets.reshape(-1), chunk_size=self.config.loss_chunk_size)
            return LMOutput(logits=None, loss=loss)
        logits = self.out(h)
        if self.direct is not None:
            logits = logits + self.direct(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(B * T, -1), targets.reshape(-1), ignore_index=-100)
        return LMOutput(logits=logits, loss=loss)
