"""Time and memory of one training step (forward + backward) at long contexts, per attention backend.

A 2-layer Llama-style model (64 wide, 2 heads, RoPE, the chunked loss, batch 1) runs one step at
n = 1k ... 32k tokens with `eager` (the reference math: a full [n, n] score matrix), `sdpa` (PyTorch's
fused kernel; on CPU a flash-style kernel whose memory is linear and time quadratic) and
`sliding_window` (w = 256, 16 global tokens, banded: linear in both). Each point runs in a fresh
process; memory is the step's peak RSS minus the RSS just before it (the model and batch built, one short
warm-up step run). Log-log slopes are fitted over the points each backend completed; eager stops where its score
matrices would not fit this machine.

    python benchmarks/long_attention.py            # writes benchmarks/results/long_attention.{json,md}
    python benchmarks/long_attention.py --quick    # n up to 4k
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_results  # noqa: E402

LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768]
BACKENDS = {"eager": {"attention": "eager"}, "sdpa": {"attention": "sdpa"},
            "sliding_window": {"attention": "sliding_window", "sliding_window": 256, "global_tokens": 16}}
EAGER_MAX = 16384  # [1, 2, n, n] float32 scores and probabilities, kept per layer: 32k would need ~35 GB


def one_point(backend: str, n: int) -> dict:
    """Runs in its own process: build, then time one step and read the peak RSS around it."""
    import resource

    import torch

    from lmlab.models.transformer.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(n_layer=2, n_head=2, n_kv_head=2, n_embd=64, mlp_hidden=128, vocab_size=256,
                      block_size=n, **BACKENDS[backend])
    model = Llama(cfg)
    x = torch.randint(0, 256, (1, n + 1))

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    # a short warm-up step first: one-time costs (kernel selection, allocator pools) out of the timing
    model(x[:, :256], targets=x[:, 1:257]).loss.backward()
    model.zero_grad(set_to_none=True)
    before = rss()
    t0 = time.perf_counter()
    model(x[:, :-1], targets=x[:, 1:]).loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {"backend": backend, "n": n, "seconds": seconds, "peak_mb": (peak - before) / 2**20}


def slope(rows: list[dict], key: str) -> float | None:
    pts = [(r["n"], r[key]) for r in rows if r.get(key, 0) > 0]
    if len(pts) < 3:
        return None
    n, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(n, y, 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n up to 4k")
    ap.add_argument("--point", nargs=2, metavar=("BACKEND", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.point:
        print(json.dumps(one_point(args.point[0], int(args.point[1]))))
        return
    lengths = [n for n in LENGTHS if not args.quick or n <= 4096]
    rows = []
    for backend in BACKENDS:
        for n in lengths:
            if backend == "eager" and n > EAGER_MAX:
                continue
            out = subprocess.run([sys.executable, __file__, "--point", backend, str(n)], capture_output=True,
                                 text=True, timeout=1800)
            if out.returncode != 0:
                rows.append({"backend": backend, "n": n, "error": out.stderr.strip().splitlines()[-1:]})
                continue
            rows.append(json.loads(out.stdout))
            print(json.dumps(rows[-1]), flush=True)
    fits = {b: {"memory_slope": slope([r for r in rows if r["backend"] == b and "peak_mb" in r], "peak_mb"),
                "time_slope": slope([r for r in rows if r["backend"] == b and "seconds" in r], "seconds")}
            for b in BACKENDS}
    data = {"machine": machine(), "rows": rows, "fits": fits,
            "note": "one forward+backward, batch 1, 2 layers, 64 wide; memory = peak RSS - RSS before the step"}
    lines = ["| backend | " + " | ".join(f"n={n // 1024}k" for n in lengths) + " | memory slope | time slope |",
             "|---" * (len(lengths) + 3) + "|"]
    for b in BACKENDS:
        cells = []
        for n in lengths:
            r = next((r for r in rows if r["backend"] == b and r["n"] == n), None)
            cells.append("-" if r is None or "peak_mb" not in r else f"{r['seconds']:.2f} s, {r['peak_mb']:.0f} MB")
        f = fits[b]
        slopes = " | ".join("-" if f[k] is None else f"{f[k]:.2f}" for k in ("memory_slope", "time_slope"))
        lines.append(f"| {b} | " + " | ".join(cells) + f" | {slopes} |")
    md = ("# Long-context attention: one training step\n\n" + data["note"] + ". Eager stops at "
          f"{EAGER_MAX // 1024}k (its [n, n] scores would need tens of GB beyond).\n\n" + "\n".join(lines) + "\n")
    name = "long_attention_quick" if args.quick else "long_attention"
    print(md)
    print(*write_results(name, data, md))


if __name__ == "__main__":
    main()
