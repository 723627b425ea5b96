"""What every lmlab language model shares: its config base class and its output type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lmlab.errors import LmlabError


@dataclass
class LMOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


@dataclass(kw_only=True)
class ModelConfig:
    """Base of every family's config; `family` picks the concrete class when loading from YAML."""

    family: str = "gpt"
    vocab_size: int = 0  # 0: taken from the prepared data's tokenizer at train time
    block_size: int = 256

    registry: ClassVar[dict[str, type["ModelConfig"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        family = cls.__dataclass_fields__["family"].default if "__dataclass_fields__" in cls.__dict__ else None
        if family is None:
            family = getattr(cls, "family", None)
        if isinstance(family, str):
            ModelConfig.registry.setdefault(family, cls)

    @classmethod
    def resolve_class(cls, data: dict[str, Any]) -> type["ModelConfig"]:
        if cls is not ModelConfig:
            return cls
        family = data.get("family", "gpt")
        from lmlab.models import registry  # noqa: F401  (imports the families, which register)

        if family not in ModelConfig.registry:
            raise LmlabError(f"unknown model family '{family}'. Known: {', '.join(ModelConfig.registry)}")
        return ModelConfig.registry[family]
