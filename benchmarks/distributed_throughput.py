"""Training throughput of `lmlab train` in one process against two under torchrun (DDP and FSDP2, gloo).

The same global batch, model and steps each way, on the same cores: one process with T threads (and
with one) against two processes with T/2 threads each, so the figure says what splitting a CPU's cores
between ranks costs or gains, not what more hardware gives. Tokens/s is the median of the logged windows after the
first (which holds start-up and the first allocations). Every configuration runs in `--rounds` rounds
that take turns, so load that comes and goes on a shared machine hits all of them.

    python benchmarks/distributed_throughput.py             # small GPT, 2 threads in all, 30 steps
    python benchmarks/distributed_throughput.py --steps 10  # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_results  # noqa: E402

MODEL = ["--model.n_layer=4", "--model.n_head=4", "--model.n_embd=256", "--model.block_size=128"]
SETUPS = {  # name: (processes, train.parallel, threads per process; 0: --threads / processes)
    "1 process": (1, "none", 0),
    "1 process, 1 thread": (1, "none", 1),
    "2 processes, DDP": (2, "ddp", 0),
    "2 processes, FSDP2": (2, "fsdp", 0),
}


def prepare_data(root: Path) -> Path:
    from lmlab.data.prepare import PrepareConfig, prepare

    out = root / "data"
    prepare(PrepareConfig(source="stdlib-docs", out=str(out), tokenizer="char", min_count=1, vocab_size=0))
    return out


def run_one(data: Path, out: Path, procs: int, parallel: str, threads: int, steps: int, batch: int) -> float:
    """Median tokens/s of `lmlab train` in `procs` processes of `threads` threads each."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
                if procs > 1 else [sys.executable])
    args = ["-m", "lmlab", "-q", "train", "--data", str(data), "--out", str(out), *MODEL,
            f"--train.batch_size={batch}", f"--train.max_steps={steps}", "--train.log_interval=5",
            "--train.eval_interval=0", "--train.ckpt_interval=0", "--train.progress=false",
            f"--train.threads={threads}", f"--train.parallel={parallel}", "--train.warmup_steps=2"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LMLAB_NO_TENSORBOARD": "1"}
    r = subprocess.run([*launcher, *args], capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [row["tok_per_s"] for row in rows if "tok_per_s" in row][1:]
    return statistics.median(speeds)


def markdown(r: dict) -> str:
    speed = r["tokens_per_s"]
    lines = [f"# `lmlab train`: 1 process against 2 (torchrun, gloo), {r['threads']} threads in all", "",
             f"Model {' '.join(r['model'])}, global batch {r['global_batch']}, {r['steps']} steps, median over "
             f"{r['rounds_run']} rounds (each round's figure in brackets). {r['note']}", "",
             "| setup | tokens/s | vs 1 process | vs 1 process, 1 thread |", "|---|---|---|---|"]
    for k, v in speed.items():
        rounds = ", ".join(f"{x:,.0f}" for x in r["rounds"][k])
        lines.append(f"| {k} | {v:,.0f} ({rounds}) | {v / speed['1 process']:.2f}x | "
                     f"{v / speed['1 process, 1 thread']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="cores in all, split between the processes")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16, help="the global batch (rows of block_size tokens)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--name", default="distributed_throughput")
    ap.add_argument("--note", default="", help="conditions to record (e.g. 'measured under load')")
    ap.add_argument("--render", action="store_true", help="rewrite the markdown from the results JSON")
    a = ap.parse_args()
    if a.render:
        from common import RESULTS

        result = json.loads((RESULTS / f"{a.name}.json").read_text())
        result.setdefault("rounds_run", len(next(iter(result["rounds"].values()))))
        print(write_results(a.name, result, markdown(result))[1].read_text())
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = prepare_data(root)
        speeds: dict[str, list[float]] = {name: [] for name in SETUPS}
        for r in range(a.rounds):
            order = list(SETUPS) if r % 2 == 0 else list(reversed(SETUPS))
            for name in order:
                procs, parallel, threads = SETUPS[name]
                out = root / f"run-{r}-{len(speeds[name])}-{procs}-{parallel}-{threads}"
                speeds[name].append(run_one(data, out, procs, parallel, threads or a.threads // procs, a.steps,
                                            a.batch))
                print(f"round {r}: {name}: {speeds[name][-1]:,.0f} tokens/s", flush=True)
    result = {"machine": machine(), "threads": a.threads, "steps": a.steps, "global_batch": a.batch,
              "model": MODEL, "note": a.note, "rounds_run": a.rounds,
              "tokens_per_s": {k: statistics.median(v) for k, v in speeds.items()}, "rounds": speeds}
    j, m = write_results(a.name, result, markdown(result))
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
