"""The tokenizer protocol shared by every lmlab tokenizer, and the standard special tokens.

Every tokenizer reserves the same five roles (pad, unk, bos, eos, mask). lmlab-trained tokenizers
put them at ids 0-4 so models of different families can share one data directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

ROLES = ("pad", "unk", "bos", "eos", "mask")


@dataclass(frozen=True)
class SpecialTokens:
    pad: str = "<pad>"
    unk: str = "<unk>"
    bos: str = "<s>"
    eos: str = "</s>"
    mask: str = "<mask>"

    def as_list(self) -> list[str]:
        return [getattr(self, r) for r in ROLES]

    def as_dict(self) -> dict[str, str]:
        return {r: getattr(self, r) for r in ROLES}


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, trainer, evaluator and generator need from a tokenizer."""

    kind: str
    specials: SpecialTokens

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int], skip_special: bool = False) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...

    def save(self, directory: str) -> None: ...


class SpecialIdsMixin:
    """`bos_id`, `eos_id`, ... looked up from `specials` through `token_to_id`."""

    specials: SpecialTokens

    def token_to_id(self, token: str) -> int | None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _role_id(self, role: str) -> int:
        tid = self.token_to_id(getattr(self.specials, role))
        if tid is None:
            raise KeyError(f"tokenizer has no {role} token")
        return tid

    @property
    def pad_id(self) -> int:
        return self._role_id("pad")

    @property
    def unk_id(self) -> int:
        return self._role_id("unk")

    @property
    def bos_id(self) -> int:
        return self._role_id("bos")

    @property
    def eos_id(self) -> int:
        return self._role_id("eos")

    @property
    def mask_id(self) -> int:
        return self._role_id("mask")

    @property
    def special_ids(self) -> set[int]:
        out = set()
        for t in self.specials.as_list():
            tid = self.token_to_id(t)
            if tid is not None:
                out.add(tid)
        return out

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]  # type: ignore[attr-defined]
