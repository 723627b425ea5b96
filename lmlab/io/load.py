"""One loader: `load_model(path)` opens every kind of model lmlab reads, for every command that uses one.

    run directory / checkpoint   lmlab's own (model.safetensors + config.yaml + tokenizer.json)
    Hugging Face directory       config.json + *.safetensors (+ tokenizer.json)
    *.gguf                       llama.cpp's format (quantized weights kept quantized where we can)
    *.arpa, *.arpa.gz            a back-off n-gram model (KenLM's lmplz writes these)
    PEFT adapter directory       adapter_config.json + adapter_model.safetensors: a LoRA adapter on the
                                 local base model its base_model_name_or_path names

It also settles the one BOS rule: `LoadedModel.bos` is what goes before every text the model reads
(generation, chat, scoring), as the model itself asks: a GGUF file's `tokenizer.ggml.add_bos_token`,
a Hugging Face tokenizer's config, and for lmlab's own runs the `</s>` that closed every training document.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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

    def scoring_split(self, ids: Sequence[int]) -> tuple[int, list[int]]:
        """(the token the first scored token is predicted from, the tokens to score) for a text encoded
        as `ids`, as perplexity's `token_nll(model, tokens, bos=...)` takes them: the text after the BOS
        (lmlab runs: `</s>`); without one the text's first token is context only, not scored (as
        llama.cpp's perplexity does for a model that takes no BOS)."""
        seq = self.bos + list(ids)
        if not seq:
            raise LmlabError("nothing to score: the text is empty")
        return seq[0], seq[1:]

    @property
    def objective(self) -> str:
        """"causal", "mlm", "seq2seq", ... (n-gram models are causal)."""
        return getattr(self.model, "objective", "causal")


# llama.cpp's default for `add_bos` when a GGUF file lacks `tokenizer.ggml.add_bos_token`
# (src/llama-vocab.cpp, llama_vocab::impl::load): by tokenizer model, SentencePiece ("llama") and
# WordPiece ("bert") add one, Unigram ("t5"), RWKV and byte-level BPE ("gpt2") do not, except the BPE
# pre-tokenizers below, which set add_bos = true; the key, when present, overrides all of these.
_GGUF_ADD_BOS_BY_MODEL = {"llama": True, "bert": True, "t5": False, "rwkv": False, "gpt2": False}
_GGUF_ADD_BOS_BY_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                        "lfm2", "tekken", "chameleon"}


def gguf_bos(meta: dict[str, Any], tokenizer: Any) -> list[int]:
    """The BOS a GGUF model's texts start with: `tokenizer.ggml.add_bos_token`, else llama.cpp's default."""
    add = meta.get("tokenizer.ggml.add_bos_token")
    if add is None:
        model = meta.get("tokenizer.ggml.model", "")
        add = (meta.get("tokenizer.ggml.pre") in _GGUF_ADD_BOS_BY_PRE) if model == "gpt2" \
            else _GGUF_ADD_BOS_BY_MODEL.get(model, False)
    bos = tokenizer.token_to_id(tokenizer.specials.bos)
    return [bos] if add and bos is not None else []


def hf_bos(path: Path, tokenizer: Any) -> list[int]:
    """The BOS a Hugging Face tokenizer puts before a text (what `tokenizer(text)` adds): its
    `tokenizer_config.json` `add_bos_token` when set (Llama-style tokenizers), else the special token
    the `tokenizer.json` post-processor's template puts first, if that is the BOS."""
    cfg_file = path / "tokenizer_config.json"
    if cfg_file.is_file():
        add = json.loads(cfg_file.read_text(encoding="utf-8")).get("add_bos_token")
        if isinstance(add, bool):
            return [tokenizer.bos_id] if add else []
    tok_file = path / "tokenizer.json"
    post = json.loads(tok_file.read_text(encoding="utf-8")).get("post_processor") if tok_file.is_file() else None
    procs = (post.get("processors") or []) if isinstance(post, dict) and post.get("type") == "Sequence" else [post]
    for proc in procs:
        if isinstance(proc, dict) and proc.get("type") == "TemplateProcessing" and proc.get("single"):
            first = proc["single"][0]
            if "SpecialToken" in first and first["SpecialToken"]["id"] == tokenizer.specials.bos:
                return [tokenizer.bos_id]
    return []


def model_kind(path: str | Path) -> str:
    p = Path(path)
    name = p.name.lower()
    if name.endswith(".gguf"):
        return "gguf"
    if name.endswith((".arpa", ".arpa.gz")):
        return "arpa"
    if p.is_dir() and (p / "config.json").is_file():
        return "hf"
    if p.is_dir() and (p / "adapter_config.json").is_file():
        return "peft"
    return "lmlab"


def _existing(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise LmlabError(f"model not found: {p}")
    return p


def model_config(path: str | Path) -> Any:
    """The architecture (a ModelConfig) of the model at `path`, without loading its weights."""
    p = _existing(path)
    kind = model_kind(p)
    if kind == "gguf":
        from lmlab.io.gguf.read import gguf_model_config, open_gguf, read_metadata

        reader = open_gguf(p)
        return gguf_model_config(reader, read_metadata(reader))
    if kind == "hf":
        from lmlab.io.hf import config_from_hf

        return config_from_hf(json.loads((p / "config.json").read_text(encoding="utf-8")))
    if kind == "peft":
        from lmlab.io.peft import base_model_path

        return model_config(base_model_path(p))
    if kind == "arpa":
        raise LmlabError(f"{p} is an n-gram model: it has no neural architecture to start from")
    from lmlab.io.checkpoint import read_model_config, resolve_checkpoint

    return read_model_config(resolve_checkpoint(p))


def model_tokenizer(path: str | Path) -> Any:
    """The tokenizer of the model at `path` (or of a directory holding a tokenizer.json), without its weights."""
    from lmlab.tokenizers import load_tokenizer

    p = _existing(path)
    kind = model_kind(p)
    if kind == "gguf":
        from lmlab.io.gguf.read import open_gguf, read_metadata
        from lmlab.io.gguf.tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(read_metadata(open_gguf(p)))
    if kind == "peft":
        from lmlab.io.peft import base_model_path

        return model_tokenizer(base_model_path(p))
    if kind == "arpa":
        raise LmlabError(f"{p} is an n-gram model: its words are its tokens, there is no tokenizer to reuse")
    if kind == "hf" or (p / "tokenizer.json").is_file() or p.is_file():
        return load_tokenizer(p)
    from lmlab.io.checkpoint import resolve_checkpoint

    return load_tokenizer(resolve_checkpoint(p))


def load_model(path: str | Path, *, device: str = "cpu", precision: str | None = None) -> LoadedModel:
    """Load the model at `path` (see the module docstring). `precision` converts the weights for inference
    (lmlab/nn/quant.py; default: the fast one for GGUF files, as stored otherwise)."""
    p = _existing(path)
    kind = model_kind(p)
    if kind == "arpa":
        from lmlab.io.arpa import read_arpa

        return LoadedModel(read_arpa(p), None, kind, p)
    from lmlab.nn.quant import DEFAULT_PRECISION

    if kind == "gguf":
        from lmlab.io.gguf.read import load_gguf

        precision = precision or DEFAULT_PRECISION
        # "gguf": quantized matrices stay in the file's blocks; other precisions start from float32
        model, tok = load_gguf(p, blocks=precision.startswith("gguf"))
        loaded = LoadedModel(model, tok, kind, p, bos=gguf_bos(tok.gguf_meta, tok))  # the file's own keys
    elif kind == "hf":
        from lmlab.io.hf import load_hf_dir

        model, tok = load_hf_dir(p)
        loaded = LoadedModel(model, tok, kind, p, bos=hf_bos(p, tok) if tok is not None else [])
    elif kind == "peft":  # a LoRA adapter on the local base model it names
        from lmlab.io.peft import base_model_path, load_peft_adapter

        base = load_model(base_model_path(p), precision="fp32")
        loaded = LoadedModel(load_peft_adapter(base.model, p), base.tokenizer, kind, p, bos=base.bos,
                             run_config=base.run_config, checkpoint=base.checkpoint)
        precision = precision or (DEFAULT_PRECISION if base.kind == "gguf" else None)
    else:
        from lmlab.io.checkpoint import load_model_dir, read_config_dict

        model, tok, ckpt = load_model_dir(p)
        # lmlab models are trained on documents each closed by </s>: a new text follows a </s>
        loaded = LoadedModel(model, tok, kind, p, bos=[tok.eos_id] if tok is not None else [],
                             run_config=read_config_dict(ckpt),
                             checkpoint=ckpt)
    if precision:
        from lmlab.nn.quant import quantize_

        loaded.model = quantize_(loaded.model, precision)
    loaded.model = loaded.model.to(device).eval()
    return loaded
