"""Multi-turn chat over any lmlab causal LM whose tokenizer carries a chat template.

Each turn renders the whole conversation with the template and re-prefills it (no KV cache kept
between turns: simple, and a 135M-parameter model prefills a few thousand tokens in well under a
second); the reply streams until the tokenizer's end-of-sequence token (e.g. <|im_end|>).

BOS: the model's own (`bos`, from `LoadedModel.bos`), put before the rendered prompt unless the
template already rendered it (many templates write `{{ bos_token }}` themselves). llama.cpp's chat
code does the same (common/chat.cpp strips a rendered leading BOS when the tokenizer adds one), so
a conversation never starts with two.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from lmlab.generate.engine import SamplingConfig, stream_text
from lmlab.tokenizers.chat_template import ChatTemplate, chat_template_for


class ChatSession:
    def __init__(self, model: nn.Module, tokenizer: Any, *, system: str | None = None,
                 template: ChatTemplate | None = None, bos: Sequence[int] = ()):
        self.model, self.tokenizer, self.bos = model, tokenizer, list(bos)
        self.template = template or chat_template_for(tokenizer)
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    def prompt_ids(self) -> list[int]:
        text = self.template.render(self.messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, allow_special=True)
        return ids if ids[:len(self.bos)] == self.bos else self.bos + ids

    def reply(self, user: str, cfg: SamplingConfig) -> Iterator[str]:
        """Stream the assistant's answer to `user`; the finished answer joins the conversation."""
        self.messages.append({"role": "user", "content": user})
        pieces: list[str] = []
        for piece in stream_text(self.model, self.tokenizer, self.prompt_ids(), cfg):
            pieces.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})
