"""Byte-level BPE trained and run by the Hugging Face `tokenizers` library (GPT-2's scheme).

Saved as a standard `tokenizer.json` plus `tokenizer_config.json` naming the special-token roles,
so `transformers.PreTrainedTokenizerFast` can load the same directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmlab.tokenizers.base import ROLES, SpecialIdsMixin, SpecialTokens
from lmlab.utils.atomic import atomic_write_text


class BPETokenizer(SpecialIdsMixin):
    kind = "bpe"
    chat_template: str | None = None  # Jinja chat template, when the source ships one (e.g. a GGUF)

    def __init__(self, hf: HFTokenizer, specials: SpecialTokens = SpecialTokens()):
        self.hf = hf
        self.specials = specials
        # Text that happens to contain "</s>" is text, not an end-of-sequence marker.
        try:
            self.hf.encode_special_tokens = True
        except AttributeError:  # tokenizers < 0.15
            pass

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int = 8192, min_count: int = 2,
              specials: SpecialTokens = SpecialTokens()) -> BPETokenizer:
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_count,
            special_tokens=specials.as_list(),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf, specials)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Ids of `text`; with `allow_special` a special token spelled in it (e.g. a chat template's
        <|im_start|>) becomes its own id instead of plain text."""
        if not allow_special:
            return self.hf.encode(text, add_special_tokens=False).ids
        self.hf.encode_special_tokens = False
        try:
            return self.hf.encode(text, add_special_tokens=False).ids
        finally:
            self.hf.encode_special_tokens = True

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def save(self, directory: str) -> None:
        d = Path(directory)
        atomic_write_text(d / "tokenizer.json", self.hf.to_str())
        cfg = {f"{r}_token": getattr(self.specials, r) for r in ROLES}
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        if self.chat_template:  # where transformers keeps it too
            cfg["chat_template"] = self.chat_template
        atomic_write_text(d / "tokenizer_config.json", json.dumps(cfg, indent=2))

    @classmethod
    def load(cls, directory: Path, data: str) -> BPETokenizer:
        hf = HFTokenizer.from_str(data)
        roles = SpecialTokens().as_dict()
        cfg_path = directory / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            for r in ROLES:
                tok = cfg.get(f"{r}_token")
                if isinstance(tok, dict):  # transformers writes AddedToken dicts sometimes
                    tok = tok.get("content")
                if isinstance(tok, str):
                    roles[r] = tok
        out = cls(hf, SpecialTokens(**roles))
        if cfg_path.is_file() and isinstance(cfg.get("chat_template"), str):
            out.chat_template = cfg["chat_template"]
        return out
