"""`lmlab train`: train a model on a prepared data directory (lmlab/train/trainer.py)."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from lmlab.cli._args import overrides
from lmlab.config import apply_overrides, describe, dump_yaml, from_dict, load_yaml
from lmlab.errors import LmlabError


def build_run_config(args: argparse.Namespace, rest: list[str]):
    from lmlab.io.load import model_config
    from lmlab.models.registry import preset
    from lmlab.train.checkpoint import read_run_config
    from lmlab.train.config import RunConfig

    if args.resume:
        cfg = read_run_config(Path(args.resume))
    elif args.config:
        cfg = from_dict(RunConfig, load_yaml(args.config))
    else:
        cfg = RunConfig()
    if args.init:
        if args.model:
            raise LmlabError(f"--init {args.init} takes the architecture from that model; drop --model {args.model}")
        cfg.model = model_config(args.init)
        cfg.train.init = args.init
    if args.model:
        vocab = cfg.model.vocab_size
        cfg.model = preset(args.model)
        cfg.model.vocab_size = vocab
    if args.data:
        cfg.data.dir = args.data
    if args.out:
        cfg.train.out_dir = args.out
    if args.resume:
        cfg.train.out_dir = args.resume
    return apply_overrides(cfg, overrides(rest))


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from lmlab.train.trainer import Trainer

    if args.consolidate:
        from lmlab.io.checkpoint import resolve_checkpoint
        from lmlab.train.checkpoint import consolidate

        print(f"wrote {consolidate(resolve_checkpoint(args.consolidate))}")
        return 0
    cfg = build_run_config(args, rest)
    run_dir = Path(cfg.train.out_dir or f"runs/{cfg.model.family}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg.train.out_dir = str(run_dir)
    if not args.resume and run_dir.exists() and any(run_dir.iterdir()):
        raise LmlabError(f"run directory {run_dir} already exists; continue it with "
                         f"`lmlab train --resume {run_dir}` or choose another --out")
    trainer = Trainer(cfg, run_dir)
    print(dump_yaml(cfg), end="")
    if args.resume and trainer.resume() is None:
        print(f"no checkpoint in {run_dir} yet; starting from step 0")
    n = trainer.model.num_params()
    print(f"model: {cfg.model.family}, {n / 1e6:.2f}M parameters without embeddings, "
          f"{trainer.model.num_params(non_embedding=False) / 1e6:.2f}M with; run directory {run_dir}")
    if cfg.lora.rank > 0:
        from lmlab.nn.lora import trainable_parameters

        k = trainable_parameters(trainer.model)
        print(f"LoRA: rank {cfg.lora.rank} on {', '.join(cfg.lora.targets)} ({cfg.lora.base} base): {k:,} trainable "
              f"parameters ({100 * k / trainer.model.num_params(non_embedding=False):.2f}%)")
    summary = trainer.fit()
    line = f"step {summary['step']}: train loss {summary['loss']:.4f}"
    if "val_loss" in summary:
        line += f", val loss {summary['val_loss']:.4f} (ppl {math.exp(summary['val_loss']):.2f})"
    print(line)
    return 0


def add_parser(add) -> None:
    from lmlab.models.registry import PRESETS
    from lmlab.train.config import RunConfig

    sp = add("train", run, "Train a model on a prepared data directory.",
             "any config key can be overridden (defaults shown):\n" + "\n".join(describe(RunConfig)) +
             "\n\nexamples:\n  lmlab train --data data/stdlib-docs --model mini --train.max_steps=300\n"
             "  lmlab train --config configs/small-stdlib-docs.yaml --train.dtype=float32\n"
             "  lmlab train --resume runs/gpt-20260101-120000     (continue exactly where it stopped)\n"
             "  torchrun --nproc-per-node=2 -m lmlab train --data data/stdlib-docs --train.parallel=fsdp\n"
             "  lmlab prepare notes.txt --tokenizer SmolLM2.gguf --out data/notes\n"
             "  lmlab train --init SmolLM2.gguf --data data/notes --model.block_size=256 --train.lr=3e-5\n"
             "      (continued pre-training from a model's weights, with its architecture and tokenizer)\n"
             "  lmlab train --init SmolLM2.gguf --data data/notes --lora.rank 8 --lora.alpha 16 \\\n"
             "      --lora.targets q_proj,v_proj --lora.base int4     (LoRA on a frozen 4-bit base)\n"
             "  lmlab export runs/<run> out/ --to hf|gguf|peft     (LoRA merged, or the adapter alone)",
             overrides=True)
    sp.add_argument("--config", help="YAML file with model/data/train sections")
    sp.add_argument("--model", metavar="PRESET", help="architecture preset: " + ", ".join(PRESETS))
    sp.add_argument("--init", metavar="MODEL", help="start from this model's weights, architecture and tokenizer "
                    "(GGUF, HF directory, lmlab run; same as --train.init)")
    sp.add_argument("--data", help="prepared data directory (same as --data.dir)")
    sp.add_argument("--out", help="run directory to create (same as --train.out_dir)")
    sp.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    sp.add_argument("--consolidate", metavar="CHECKPOINT", help="write model.safetensors into a sharded "
                    "(FSDP) checkpoint, or a run's latest, and exit (lmlab's loaders read either)")
