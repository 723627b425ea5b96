"""A conditional masked language model (CMLM; Ghazvininejad et al. 2019, "Mask-Predict").

BART's encoder-decoder (lmlab/models/transformer/bart.py) with a *bidirectional* decoder: given the source and a
target in which some tokens are <mask>, it predicts every masked token at once from all the others.
Training masks n ~ Uniform{1, ..., len} target tokens (lmlab/data/seq2seq.py) and takes the
cross-entropy of the masked ones. The target length, which a non-autoregressive decoder must know
before it starts, is classified from the mean of the encoder's states over the source (the paper uses
a special LENGTH token in the encoder instead; both read the whole source). Loss = masked-token CE +
`length_loss_weight` x length CE; decoding by mask-predict is lmlab/generate/nar.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.models.base import LMOutput
from lmlab.models.transformer.bart import BART, BartConfig


@dataclass(kw_only=True)
class CMLMConfig(BartConfig):
    family: str = "cmlm"
    mask_id: int = 4                 # lmlab tokenizers: <mask> = 4 (lmlab/tokenizers/base.py)
    # weight of the length term; fairseq's CMLM adds it with a factor of 0.1 ("length_loss_factor"),
    # which keeps the easy length task from dominating the gradients early on
    length_loss_weight: float = 0.1


class CMLM(BART):
    config_class = CMLMConfig
    objective = "cmlm"       # trains on masked (source, target) pairs (lmlab/data/objectives.py)
    causal_decoder = False   # every target position sees every other

    def __init__(self, config: CMLMConfig):
        super().__init__(config)
        # length classes 0 .. block_size (0 never occurs in training data; decoding skips it)
        self.length_head = nn.Linear(config.n_embd, config.block_size + 1)
        nn.init.normal_(self.length_head.weight, std=config.init_std)
        nn.init.zeros_(self.length_head.bias)

    def length_logits(self, memory: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, block_size + 1] scores of the target length, from the mean encoder state over the source."""
        if attention_mask is None:
            return self.length_head(memory.mean(dim=1))
        m = attention_mask.to(memory.dtype)[..., None]
        return self.length_head((memory * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0))

    def predict(self, cross_kv: list[tuple[torch.Tensor, torch.Tensor]], decoder_input_ids: torch.Tensor, *,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at every target position of a partly masked target (right-padded with <pad>)."""
        return self.decode(decoder_input_ids, cross_kv, attention_mask=attention_mask,
                           decoder_mask=decoder_input_ids != self.config.pad_id)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None,
                target_lengths: torch.Tensor | None = None) -> LMOutput:
        """Training: `decoder_input_ids` the masked target, `targets` the original tokens at the masked
        positions (-100 elsewhere), `target_lengths` the true lengths; the length CE goes to `aux_loss`."""
        if decoder_input_ids is None:
            raise ValueError("a CMLM needs decoder_input_ids (the target with some tokens masked)")
        memory = self.encode(input_ids, attention_mask)
        logits = self.predict(self.cross_kv(memory), decoder_input_ids, attention_mask=attention_mask)
        loss = aux = None
        if targets is not None:
            picked = targets != -100
            loss = F.cross_entropy(logits[picked].float(), targets[picked]) if bool(picked.any()) else logits.sum() * 0
        if target_lengths is not None:
            length_ce = F.cross_entropy(self.length_logits(memory, attention_mask).float(), target_lengths)
            aux = self.config.length_loss_weight * length_ce
        return LMOutput(logits=logits, loss=loss, aux_loss=aux)
