"""Peak memory and time of one training step of the gpt2-124m shape, by memory-saving option.

Batch 8 x 1024, vocabulary 50,257, one forward + backward + AdamW step, each configuration in a fresh
process: the plain fp32 step (logits materialised), then activation checkpointing, bf16 autocast and
the chunked output-layer loss each alone, then all three together. Memory is the step's peak RSS minus
the RSS before it (model, optimizer state and batch built, one warm-up step at batch 1 x 128 run).

    python benchmarks/train_memory.py          # writes benchmarks/results/train_memory.{json,md}
    python benchmarks/train_memory.py --quick  # a 4-layer model, batch 4 x 256
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_results  # noqa: E402

CONFIGS = {
    "plain fp32": {},
    "checkpointing": {"checkpointing": True},
    "bf16": {"dtype": "bfloat16"},
    "chunked loss": {"chunked": True},
    "all three": {"checkpointing": True, "dtype": "bfloat16", "chunked": True},
}


def one(name: str, quick: bool) -> dict:
    import resource

    import torch

    from lmlab.models.registry import build, preset
    from lmlab.train.checkpointing import checkpoint_blocks
    from lmlab.train.optim import make_optimizer

    opts = CONFIGS[name]
    cfg = preset("gpt2-124m")
    cfg.vocab_size = 50257
    cfg.loss_chunk_size = 512 if opts.get("chunked") else 0
    B, T = 8, 1024
    if quick:
        cfg.n_layer, B, T = 4, 4, 256
    torch.manual_seed(0)
    model = build(cfg)
    if opts.get("checkpointing"):
        checkpoint_blocks(model)
    opt = make_optimizer(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    dtype = torch.bfloat16 if opts.get("dtype") == "bfloat16" else None

    def step(x):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = model(x[:, :-1], targets=x[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(torch.randint(0, cfg.vocab_size, (1, 129)))  # warm-up: optimizer state, kernels
    x = torch.randint(0, cfg.vocab_size, (B, T + 1))
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * 4096
    t0 = time.perf_counter()
    step(x)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"config": name, "seconds": seconds, "peak_mb": (peak - before) / 2**20, "batch": [B, T],
            "n_layer": cfg.n_layer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.quick)))
        return
    rows = []
    for name in CONFIGS:
        cmd = [sys.executable, __file__, "--one", name] + (["--quick"] if args.quick else [])
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            raise SystemExit(out.stderr)
        rows.append(json.loads(out.stdout))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    for r in rows:
        r["memory_vs_plain"] = r["peak_mb"] / base["peak_mb"]
        r["time_vs_plain"] = r["seconds"] / base["seconds"]
    lines = ["| configuration | peak MB | x plain | step s | x plain |", "|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['peak_mb']:.0f} | {r['memory_vs_plain']:.2f} | {r['seconds']:.1f} | "
              f"{r['time_vs_plain']:.2f} |" for r in rows]
    B, T = base["batch"]
    md = (f"# One training step, {base['n_layer']} layers x 768, batch {B} x {T}, vocabulary 50,257\n\n"
          "Peak RSS minus the RSS before the step; each configuration in a fresh process.\n\n"
          + "\n".join(lines) + "\n")
    print(md)
    print(*write_results("train_memory_quick" if args.quick else "train_memory",
                         {"machine": machine(), "rows": rows}, md))


if __name__ == "__main__":
    main()
