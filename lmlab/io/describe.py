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
    from lmlab.data.prepare import read_meta

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
