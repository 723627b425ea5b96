"""Hugging Face interop: one adapter per family maps configs and weights to and from `transformers`.

Directories hold `config.json` + `model.safetensors` (or a sharded `model.safetensors.index.json`)
and optionally `tokenizer.json`; weights are read and written as safetensors only (never pickle).
Adding a family means adding its module here (an `Adapter` passed to `register`) and importing it below.
"""

from __future__ import annotations

from lmlab.io.hf import bart, bert, gpt2, llama, mixtral, vit  # noqa: F401  (each registers its adapter)
from lmlab.io.hf.adapter import (
                                 ADAPTERS,
                                 config_from_hf,
                                 config_to_hf,
                                 from_hf,
                                 state_dict_from_hf,
                                 state_dict_to_hf,
                                 to_hf,
)
from lmlab.io.hf.directory import load_hf_dir, save_hf_dir

__all__ = ["ADAPTERS", "config_from_hf", "config_to_hf", "from_hf", "load_hf_dir", "save_hf_dir",
           "state_dict_from_hf", "state_dict_to_hf", "to_hf"]
