"""`lmlab export MODEL OUT --to hf|gguf|peft`: write a model in an ecosystem format (lmlab/io/export.py)."""

from __future__ import annotations

import argparse

from lmlab.io.export import FORMATS, export_model


def run(args: argparse.Namespace, rest: list[str]) -> int:  # noqa: ARG001
    path = export_model(args.model, args.out, args.to, qtype=args.qtype, overwrite=args.force)
    print(f"wrote {path}")
    return 0


def add_parser(add) -> None:
    sp = add("export", run, "Write a model as a Hugging Face directory, a GGUF file, or its LoRA adapter (PEFT).",
             "LoRA adapters are merged into the weights for hf and gguf; peft writes the adapter alone\n"
             "(adapter_config.json + adapter_model.safetensors, as peft.PeftModel.from_pretrained loads it).\n\n"
             "examples:\n  lmlab export runs/<run> smollm2-shakespeare --to hf\n"
             "  lmlab export runs/<run> smollm2-shakespeare.gguf --to gguf --qtype Q8_0\n"
             "  lmlab export runs/<lora-run> adapter/ --to peft")
    sp.add_argument("model", metavar="MODEL", help="run or checkpoint directory, .gguf file, HF or PEFT directory")
    sp.add_argument("out", metavar="OUT", help="directory (hf, peft) or file (gguf) to write")
    sp.add_argument("--to", choices=FORMATS, required=True, help="the format to write")
    sp.add_argument("--qtype", default="F16", help="GGUF weight type (F32, F16, Q8_0, Q4_1, ...)")
    sp.add_argument("--force", action="store_true", help="replace OUT if it exists")
