"""One loader: `load_model(path)` opens every kind of model lmlab reads, for every command that uses one.

    run directory / checkpoint   lmlab's own (model.safetensors + config.yaml + tokenizer.json)
    Hugging Face directory       config.json + *.safetensors (+ tokenizer.json)
    *.gguf                       llama.cpp's format (quantized weights kept quantized where we can)
    *.arpa, *.arpa.gz            a back-off n-gram model (KenLM's lmplz writes these)

It also settles the one BOS rule: `LoadedModel.bos` is what goes before every text the model reads
(generation, chat, scoring), as the model itself asks: a GGUF file's `tokenizer.ggml.add_bos_token`,
a Hugging Face tokenizer's config, and for lmlab's own runs the `</s>` that closed every training document.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError


@dataclass
class LoadedModel:
    model: Any                      # an nn.Module, or an NGramModel for ARPA files
    tokenizer: Any                  # lmlab Tokenizer (None for ARPA files: words are their own tokens)
    kind: str                       # "lmlab" | "hf" | "gguf" | "arpa"
    path: Path
    bos: list[int] = field(default_factory=list)  # token ids put before every text
    run_config: dict[str, Any] | None = None      # lmlab runs: config.yaml as plain data
    checkpoint: Path | None = None                # lmlab runs: the step-N directory loaded

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def objective(self) -> str:
        """"causal", "mlm", "seq2seq", ... (n-gram models are causal)."""
        return getattr(self.model, "objective", "causal")


def model_kind(path: str | Path) -> str:
    p = Path(path)
    name = p.name.lower()
    if name.endswith(".gguf"):
        return "gguf"
    if name.endswith((".arpa", ".arpa.gz")):
        return "arpa"
    if p.is_dir() and (p / "config.json").is_file():
        return "hf"
    return "lmlab"


def load_model(path: str | Path, *, device: str = "cpu", precision: str | None = None) -> LoadedModel:
    """Load the model at `path` (see the module docstring). `precision` converts the weights for inference
    (lmlab/nn/quant.py; default: the fast one for GGUF files, as stored otherwise)."""
    p = Path(path)
    if not p.exists():
        raise LmlabError(f"model not found: {p}")
    kind = model_kind(p)
    if kind == "arpa":
        from lmlab.io.arpa import read_arpa

        return LoadedModel(read_arpa(p), None, kind, p)
    if kind == "gguf":
        from lmlab.io.gguf.read import load_gguf, open_gguf, read_metadata
        from lmlab.nn.quant import DEFAULT_PRECISION

        model, tok = load_gguf(p)
        add_bos = bool(read_metadata(open_gguf(p)).get("tokenizer.ggml.add_bos_token", False))
        loaded = LoadedModel(model, tok, kind, p, bos=[tok.bos_id] if add_bos else [])
        precision = precision or DEFAULT_PRECISION
    elif kind == "hf":
        from lmlab.io.hf import load_hf_dir

        model, tok = load_hf_dir(p)
        loaded = LoadedModel(model, tok, kind, p)
    else:
        from lmlab.io.checkpoint import load_model_dir, read_config_dict

        model, tok, ckpt = load_model_dir(p)
        # lmlab models are trained on documents each closed by </s>: a new text follows a </s>
        loaded = LoadedModel(model, tok, kind, p, bos=[tok.eos_id], run_config=read_config_dict(ckpt),
                             checkpoint=ckpt)
    if precision:
        from lmlab.nn.quant import quantize_

        loaded.model = quantize_(loaded.model, precision)
    loaded.model = loaded.model.to(device).eval()
    return loaded
