"""Multi-turn chat over any lmlab causal LM whose tokenizer carries a chat template.

Each turn renders the whole conversation with the template and re-prefills it (no KV cache kept
between turns: simple, and a 135M-parameter model prefills a few thousand tokens in well under a
second); the reply streams until the tokenizer's end-of-sequence token (e.g. <|im_end|>).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

from lmlab.generate.engine import SamplingConfig, stream_text
from lmlab.tokenizers.chat_template import ChatTemplate, chat_template_for


class ChatSession:
    def __init__(self, model: nn.Module, tokenizer: Any, *, system: str | None = None,
                 template: ChatTemplate | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.template = template or chat_template_for(tokenizer)
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    def prompt_ids(self) -> list[int]:
        text = self.template.render(self.messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, allow_special=True)

    def reply(self, user: str, cfg: SamplingConfig) -> Iterator[str]:
        """Stream the assistant's answer to `user`; the finished answer joins the conversation."""
        self.messages.append({"role": "user", "content": user})
        pieces: list[str] = []
        for piece in stream_text(self.model, self.tokenizer, self.prompt_ids(), cfg):
            pieces.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})
