"""`lmlab info`: a human summary of a data directory, a run directory or a checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

from lmlab.errors import LmlabError


def describe_path(path: Path) -> str:
    if not path.exists():
        raise LmlabError(f"not found: {path}")
    if (path / "meta.json").is_file():
        return _describe_data(path)
    return _describe_checkpoint(path)


def _describe_data(path: Path) -> str:
    from lmlab.data.images import FORMAT as IMAGES
    from lmlab.data.prepare import read_meta

    if json.loads((path / "meta.json").read_text(encoding="utf-8")).get("format") == IMAGES:
        return _describe_images(path)
    m = read_meta(path)
    c = m["corpus"]
    lines = [f"data directory {path}",
             f"  corpus     {c['source']} ({c['n_documents']} documents, Python {c['python_version']}, "
             f"{c['content_hash'][:19]}...)",
             f"  tokenizer  {m['tokenizer']['kind']}, vocabulary {m['vocab_size']:,}, stored as {m['dtype']}"]
    for name, s in m["splits"].items():
        ratio = s["n_bytes"] / s["n_tokens"] if s["n_tokens"] else 0
        lines.append(f"  {name:<5}      {s['n_tokens']:>12,} tokens  {s['n_docs']:>7,} documents  "
                     f"{s['n_bytes']:>12,} bytes  ({ratio:.2f} bytes/token, {len(s['shards'])} shard(s))")
    return "\n".join(lines)


def _describe_images(path: Path) -> str:
    m = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    model = m["model"]
    lines = [f"image directory {path} ({m['task']})", f"  source     {m['corpus']['source']}",
             f"  images     {model['image_size']}x{model['image_size']}, {model['n_channels']} channel(s)"
             + (f", {model['n_classes']} classes: {', '.join(model['labels'][:12])}" if "labels" in model else
                f", captions of up to {m['max_tokens']} tokens, vocabulary {m['vocab_size']}")]
    lines += [f"  {name:<5}      {s['n']:>8,} images" for name, s in m["splits"].items()]
    return "\n".join(lines)


def _describe_checkpoint(path: Path) -> str:
    import yaml

    from lmlab.io.checkpoint import list_checkpoints, read_config_dict, read_model_config, resolve_checkpoint
    from lmlab.models.registry import build

    ckpt = resolve_checkpoint(path)
    cfg = read_config_dict(ckpt)
    model_cfg = read_model_config(ckpt)
    model = build(model_cfg)
    info = json.loads((ckpt / "info.json").read_text()) if (ckpt / "info.json").is_file() else {}
    lines = [f"checkpoint {ckpt}",
             f"  model      {model_cfg.family}: {model.num_params() / 1e6:.2f}M parameters without embeddings, "
             f"{model.num_params(non_embedding=False) / 1e6:.2f}M with",
             f"  step       {info.get('step', '?')}, {info.get('tokens_seen', 0):,} tokens seen"]
    if "val_loss" in info:
        lines.append(f"  val loss   {info['val_loss']:.4f} (perplexity {math.exp(info['val_loss']):.2f})")
    lines.append(f"  data       {cfg.get('data', {}).get('dir', '?')}")
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    if run is not None:
        lines.append(f"  checkpoints in run: {', '.join(p.name for p in list_checkpoints(run))}")
    lines.append("config:")
    lines += ["  " + ln for ln in yaml.safe_dump(cfg, sort_keys=False).splitlines()]
    return "\n".join(lines)


def describe_model(name: str, *, context: int | None = None, batch: int = 1, devices: int = 8,
                   vocab_size: int = 50257) -> str:
    """`lmlab info --model PRESET`: parameters, FLOPs and memory of a preset, from its meta-device build
    (lmlab/models/sizing.py)."""
    from lmlab.models.registry import preset
    from lmlab.models.sizing import GIB, size

    cfg = preset(name)
    note = ""
    if cfg.vocab_size <= 0:  # small presets take it from the tokenizer
        cfg.vocab_size = vocab_size
        note = " (assumed: the preset takes its vocabulary from the tokenizer; --vocab-size)"
    s = size(cfg, context=context, batch=batch)
    p = s.params

    def n(x: float) -> str:
        return next(f"{x / d:.2f}{u}" for d, u in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"), (1, ""))
                    if x >= d or d == 1)

    def flop(x: float) -> str:
        return next(f"{x / d:.1f} {u}FLOP" for d, u in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1, ""))
                    if x >= d or d == 1)

    def gib(x: float) -> str:
        return f"{x / GIB:,.1f} GiB" if x >= GIB / 10 else f"{x / 2**20:,.1f} MiB"

    moe = (f"{n(p.active)} ({p.active / p.total:.1%}) per token: experts {n(p.experts)}, "
           f"{getattr(cfg, 'n_expert_per_token', 0)} of {getattr(cfg, 'n_expert', 0)} active"
           if p.experts else f"{n(p.active)} (dense: all)")
    lines = [f"model {name}: {cfg.family}, {s.n_layer} layers, n_embd {getattr(cfg, 'n_embd', '?')}, "
             f"vocabulary {cfg.vocab_size:,}{note}",
             f"  parameters    {n(p.total)} total with embeddings ({p.total:,}); {n(p.total - p.embedding)} without "
             f"the {n(p.embedding)} in input embedding tables",
             f"  active        {moe}",
             f"  FLOPs/token   forward {flop(s.flops_forward)}, training {flop(s.flops_train)} at context "
             f"{s.context:,} (2N + 4 L d T and 3x; N = {n(p.matmul)} active matmul weights, output layer in)",
             f"  train memory  weights {gib(4 * p.total)} + gradients {gib(4 * p.total)} + AdamW {gib(8 * p.total)} "
             f"(float32); activations for {batch} x {s.context:,} tokens (bf16) {gib(s.activations_bytes)}, "
             f"{gib(s.activations_ckpt_bytes)} with checkpointing",
             f"                total {gib(s.train_bytes())} ({gib(s.train_bytes(checkpointing=True))} checkpointed); "
             f"FSDP over {devices}: {gib(s.train_bytes(devices=devices))} per device "
             f"({gib(s.train_bytes(True, devices))} checkpointed)",
             "  inference     weights " + ", ".join(f"{k} {gib(v)}" for k, v in s.weights_bytes.items())
             + f"; KV cache (bf16, {batch} x {s.context:,}) {gib(s.kv_cache_bytes)}"]
    m = s.machine
    avail = m.get("ram_available", 0)
    fits = [k for k in s.weights_bytes if s.infer_bytes(k) <= avail]
    train = ("fits" if s.train_bytes() <= avail else "fits with checkpointing" if s.train_bytes(True) <= avail
             else "does not fit")
    lines.append(f"  this machine  RAM {gib(m.get('ram_total', 0))} ({gib(avail)} available)"
                 + (f", GPU {gib(m['gpu_total'])}" if "gpu_total" in m else "")
                 + f": inference {'fits in ' + fits[0] if fits else 'does not fit at any precision'}; "
                 f"training {train} (one device, batch {batch})")
    return "\n".join(lines)
