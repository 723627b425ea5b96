"""BERT (Devlin et al. 2019): a bidirectional Transformer encoder trained as a masked language model.

Token + learned position (+ optional token-type) embeddings go through a LayerNorm, then post-norm
blocks (norm(x + attn(x)), norm(x + mlp(x)); Vaswani et al. 2017) with an erf-GELU MLP and no causal
mask. The MLM head is dense -> GELU -> LayerNorm -> a decoder tied to the word embeddings with a bias
of its own. Targets are -100 except at the masked positions (see lmlab/data/mlm.py); only those rows
go through the head during training, which is ~15% of the work of scoring every position.

With `n_classes` > 0 the model is also a sequence classifier (BertForSequenceClassification's shape):
the final hidden state of the first position ([CLS]; `pool="cls"`) or the mean over the unpadded
positions (`pool="mean"`) goes through BERT's pooler (dense -> tanh, Devlin et al. 2019 sec. 3 and
appendix A.3) and a linear layer to class logits; `labels` give a cross-entropy loss. The MLM head stays
(unused), so an MLM-pretrained encoder loads into it whole and only the pooler and classifier are new
(`new_weights`, for `lmlab train --init`). lmlab's labelled-text data (lmlab/data/classify.py) puts the
tokenizer's `</s>` at the first position, as lmlab's MLM pretraining windows see it between documents.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.models.base import LMOutput, ModelConfig, count_params, init_normal
from lmlab.nn.attention import padding_mask
from lmlab.nn.block import Block
from lmlab.nn.mlp import ACTIVATIONS


@dataclass(kw_only=True)
class BertConfig(ModelConfig):
    family: str = "bert"
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    mlp_hidden: int = 1536         # "intermediate_size", 4 n_embd in BERT-base
    type_vocab_size: int = 2       # token-type (segment) embeddings; 0: none
    activation: str = "gelu"       # BERT's exact (erf) GELU
    norm_eps: float = 1e-12        # BERT's LayerNorm epsilon
    dropout: float = 0.1
    tie_embeddings: bool = True    # the MLM decoder shares the word embeddings (always, as in BERT)
    init_std: float = 0.02
    pad_id: int = 0                # its embedding row starts at zero and is never updated (as in BERT)
    n_classes: int = 0             # > 0: a sequence classifier; set from labelled-text data at train time
    labels: list[str] = field(default_factory=list)  # class names, index = label id (from the data)
    pool: str = "cls"              # cls: the first position | mean: mean over the unpadded positions

POOLS = ("cls", "mean")


class BERT(nn.Module):
    config_class = BertConfig

    @property
    def objective(self) -> str:
        """Picks the training-batch sampler (lmlab/data/objectives.py): masked LM, or a text classifier."""
        return "classify_text" if self.config.n_classes > 0 else "mlm"

    @property
    def new_weights(self) -> tuple[str, ...]:
        """Prefixes of weights an MLM-pretrained encoder does not have: initialised here, not loaded."""
        return ("pooler.", "classifier.") if self.config.n_classes > 0 else ()

    def __init__(self, config: BertConfig):
        super().__init__()
        c = config
        if c.vocab_size <= 0:
            raise ValueError("BertConfig.vocab_size must be set (it comes from the tokenizer)")
        if not c.tie_embeddings:
            raise ValueError("BERT's MLM decoder is always tied to the word embeddings")
        self.config = c
        self.wte = nn.Embedding(c.vocab_size, c.n_embd, padding_idx=c.pad_id)  # <pad> gets no gradient
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.wtt = nn.Embedding(c.type_vocab_size, c.n_embd) if c.type_vocab_size > 0 else None
        self.norm_emb = nn.LayerNorm(c.n_embd, eps=c.norm_eps)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.n_embd, c.n_head, mlp_hidden=c.mlp_hidden, activation=c.activation, norm_eps=c.norm_eps,
                  dropout=c.dropout, causal=False, post_norm=True) for _ in range(c.n_layer))
        # MLM head ("cls.predictions" in transformers)
        self.head_dense = nn.Linear(c.n_embd, c.n_embd)
        self.head_act = ACTIVATIONS[c.activation]
        self.head_norm = nn.LayerNorm(c.n_embd, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=True)
        if c.n_classes > 0:
            if c.pool not in POOLS:
                raise ValueError(f"BERT pool must be one of {POOLS}, not '{c.pool}'")
            self.pooler = nn.Linear(c.n_embd, c.n_embd)
            self.classifier = nn.Linear(c.n_embd, c.n_classes)
        init_normal(self, self.config.init_std)
        self.lm_head.weight = self.wte.weight


    def num_params(self, non_embedding: bool = True) -> int:
        return count_params(self, non_embedding, (self.wte, self.wpe, self.wtt))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, T, n_embd]."""
        B, T = input_ids.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        x = self.wte(input_ids) + self.wpe(torch.arange(T, device=input_ids.device))[None]
        if self.wtt is not None:
            tt = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.wtt(tt)
        elif token_type_ids is not None:
            raise ValueError("this BERT has no token-type embeddings (type_vocab_size=0)")
        x = self.drop(self.norm_emb(x))
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = padding_mask(attention_mask.to(torch.bool), T)
        for block in self.blocks:
            x = block(x, attn_mask=mask)
        return x

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.head_norm(self.head_act(self.head_dense(h))))

    def classify(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Class logits [B, n_classes] from final hidden states [B, T, n_embd]."""
        if self.config.pool == "cls":
            pooled = h[:, 0]
        else:
            m = torch.ones(h.shape[:2], device=h.device) if attention_mask is None else attention_mask.to(h.dtype)
            pooled = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
        return self.classifier(self.drop(torch.tanh(self.pooler(pooled))))

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> LMOutput:
        h = self.encode(input_ids, attention_mask, token_type_ids)
        if labels is not None or (self.config.n_classes > 0 and targets is None):
            if self.config.n_classes <= 0:
                raise ValueError("this BERT has no classifier (n_classes=0): labels need a classification head")
            logits = self.classify(h, attention_mask)
            loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
            return LMOutput(logits=logits, loss=loss)
        if targets is None:
            return LMOutput(logits=self.head(h))
        # training: the head only at the masked positions (targets != -100)
        picked = targets != -100
        logits = self.head(h[picked])
        loss = F.cross_entropy(logits.float(), targets[picked]) if logits.shape[0] else h.sum() * 0.0
        return LMOutput(logits=None, loss=loss)
