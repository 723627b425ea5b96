"""`export_model`: any model the one loader opens, written as a Hugging Face directory, a GGUF file
(Llama family) or, for a model with LoRA adapters, the adapters alone in PEFT's format. For the first
two the adapters are merged into the weights (lmlab/nn/lora.py), so the result loads anywhere."""

from __future__ import annotations

from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.io.load import load_model
from lmlab.nn.lora import lora_layers, merge_lora

FORMATS = ("hf", "gguf", "peft")


def export_model(source: str | Path, out: str | Path, fmt: str, *, qtype: str = "F16",
                 overwrite: bool = False) -> Path:
    if fmt not in FORMATS:
        raise LmlabError(f"unknown export format '{fmt}' ({' | '.join(FORMATS)})")
    loaded = load_model(source, precision="fp32")
    if loaded.kind == "arpa":
        raise LmlabError(f"{source} is an n-gram model; it has no neural weights to export")
    if fmt == "peft":
        from lmlab.io.peft import save_peft_adapter

        if not lora_layers(loaded.model):
            raise LmlabError(f"{source} has no LoRA adapters (train with --lora.rank > 0); export it --to hf or gguf")
        init = ((loaded.run_config or {}).get("train") or {}).get("init")
        base = str(Path(init).resolve()) if init else None
        return save_peft_adapter(loaded.model, out, base_model=base, overwrite=overwrite)
    model = merge_lora(loaded.model)
    if fmt == "hf":
        from lmlab.io.hf import save_hf_dir

        return save_hf_dir(model, out, loaded.tokenizer, overwrite=overwrite)
    from lmlab.io.gguf.write import save_gguf

    return save_gguf(model, out, loaded.tokenizer, qtype=qtype, overwrite=overwrite)
