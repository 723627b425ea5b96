"""Training throughput of lmlab's GPT against Hugging Face transformers' GPT2LMHeadModel.

Same shapes, same batch, same random data, dropout off, AdamW step included: tokens/s and model
FLOPs utilisation (6 * N * tokens/s over this machine's measured matmul peak, with N counted without
and with embeddings), for fp32 and bf16 autocast, eager (and compiled with
--compile). Also a short real-data run in fp32 and bf16 to compare their loss curves.

Each side trains alone in a fresh process, in rounds that take turns (transformers, lmlab, lmlab,
transformers), and tokens/s comes from its median step time: load that comes and goes on a shared
machine hits both. A fresh process each, as a training run has, because the heap a step finds decides
its speed: sharing one process, transformers' bf16 step took 745-903 ms depending on what ran before it
(its 33-67 MB logits buffers are page-faulted afresh, or not), and stepping the two models alternately
made it ~20% faster, its large temporaries reusing memory the other model's step had just freed.

    python benchmarks/train_throughput.py                # everything (~30 min on 2 cores)
    python benchmarks/train_throughput.py --quick        # the small config only
    python benchmarks/train_throughput.py --part curves  # rerun one part, keep the other from the results file
    python benchmarks/train_throughput.py --device cuda --compile   # a GPU: issue 22's shape (gpt2-124m,
                                                        # batch 16 x 1024), eager and compiled, peak memory

On CUDA the step is timed between device synchronisations and each side's peak allocated memory is
recorded; lmlab takes its generic kernel path there (lmlab/nn/device_paths.py), as it does compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, matmul_peak, write_results  # noqa: E402

from lmlab.models.transformer.gpt import GPT, GPTConfig  # noqa: E402
from lmlab.train.optim import make_optimizer  # noqa: E402
from lmlab.train.trainer import autocast  # noqa: E402

CONFIGS = {
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=8192, batch_size=8),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=256, vocab_size=50257, batch_size=4),
    # issue 22's GPU measurement: transformers 151,611 tokens/s, lmlab 24,856 on one H200 (torch 2.11, bf16)
    "gpt2-124m-gpu": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, batch_size=16),
}


def build_lmlab(c: dict) -> torch.nn.Module:
    cfg = GPTConfig(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], block_size=c["block_size"],
                    vocab_size=c["vocab_size"], dropout=0.0)
    return GPT(cfg)


def build_hf(c: dict) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=c["vocab_size"], n_positions=c["block_size"], n_embd=c["n_embd"],
                     n_layer=c["n_layer"], n_head=c["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     activation_function="gelu_new")
    return GPT2LMHeadModel(cfg)


def n_params(model: torch.nn.Module, c: dict) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    emb = c["vocab_size"] * c["n_embd"] + c["block_size"] * c["n_embd"]
    return total - emb, total


def step_fn(model, kind: str, dtype: str, device: str | torch.device = "cpu"):
    """One training step as `lmlab train` takes it: autocast, backward, clipping, fused AdamW."""
    dev = torch.device(device)
    opt = make_optimizer(model, lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)

    def step(x, y):
        with autocast(dev, "bfloat16" if dtype == "bf16" else "float32"):
            if kind == "hf":
                loss = model(input_ids=x, labels=x).loss  # HF shifts labels inside
            else:
                loss = model(x, y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def measure(name: str, dtype: str, compiled: bool, warmup: int, steps: int, rounds: int = 2,
            device: str = "cpu") -> tuple[dict[str, float], dict[str, float], dict[str, list[float]]]:
    """tokens/s of each side from its median step time over `rounds` runs, the sides taking turns, each
    run in a fresh process (see the module docstring); each side's peak memory (CUDA only, else 0); and
    each side's tokens/s per round (its median step in that run), for the spread."""
    c = CONFIGS[name]
    times = {"hf": [], "lmlab": []}
    memory = {"hf": 0.0, "lmlab": 0.0}
    per_round = {"hf": [], "lmlab": [], "load": []}  # "load": the 1-minute load average before each run
    tokens = c["batch_size"] * c["block_size"]
    for r in range(rounds):
        for kind in (list(times) if r % 2 == 0 else list(times)[::-1]):
            per_round["load"].append(os.getloadavg()[0])
            job = dict(config=name, kind=kind, dtype=dtype, compiled=compiled, warmup=warmup, steps=steps,
                       threads=torch.get_num_threads(), device=device)
            run = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                                 text=True)
            if run.returncode != 0:
                raise RuntimeError(f"worker {job} failed:\n{run.stderr[-2000:]}")
            got = json.loads(run.stdout.strip().splitlines()[-1])
            times[kind] += got["times"]
            per_round[kind].append(tokens / statistics.median(got["times"]))
            memory[kind] = max(memory[kind], got["peak_memory"])
    return {kind: tokens / statistics.median(t) for kind, t in times.items()}, memory, per_round


def worker(job: dict) -> dict:
    """Step times of one side, alone in this process: a fresh model, `warmup` steps, then `steps` timed;
    and its peak allocated memory on CUDA."""
    torch.set_num_threads(job["threads"])
    dev = torch.device(job.get("device", "cpu"))
    cuda = dev.type == "cuda"
    c = CONFIGS[job["config"]]
    T, B = c["block_size"], c["batch_size"]
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, c["vocab_size"], (job["warmup"] + job["steps"], B, T + 1), generator=g).to(dev)
    torch.manual_seed(0)
    model = (build_hf if job["kind"] == "hf" else build_lmlab)(c).to(dev)
    model.train()
    step = step_fn(torch.compile(model) if job["compiled"] else model, job["kind"], job["dtype"], dev)
    times = []
    for i in range(job["warmup"] + job["steps"]):
        if i == job["warmup"] and cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        step(data[i, :, :-1], data[i, :, 1:])
        if cuda:
            torch.cuda.synchronize(dev)
        if i >= job["warmup"]:
            times.append(time.perf_counter() - t0)
    return {"times": times, "peak_memory": torch.cuda.max_memory_allocated(dev) if cuda else 0}


def loss_curves(steps: int) -> dict:
    """fp32 vs bf16-autocast loss on the built-in corpus, same seed and data (the quickstart model)."""
    import tempfile

    from lmlab.data.prepare import PrepareConfig, prepare
    from lmlab.train.config import DataConfig, RunConfig, TrainConfig
    from lmlab.train.trainer import Trainer

    data = Path("data/stdlib-docs")
    if not (data / "meta.json").is_file():
        prepare(PrepareConfig(source="stdlib-docs", out=str(data)))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            cfg = RunConfig(model=GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=128),
                            data=DataConfig(dir=str(data)),
                            train=TrainConfig(out_dir=f"{tmp}/{dtype}", max_steps=steps, batch_size=16, lr=2e-3,
                                              min_lr=2e-4, warmup_steps=30, eval_interval=0, eval_iters=20,
                                              ckpt_interval=0, log_interval=10, progress=False, dtype=dtype))
            t0 = time.perf_counter()
            summary = Trainer(cfg, cfg.train.out_dir, quiet=True).fit()
            out[dtype] = {"val_loss": summary["val_loss"], "train_loss": summary["loss"],
                          "seconds": time.perf_counter() - t0}
    fp32 = out["float32"]["val_loss"]
    out["val_loss_rel_diff"] = abs(out["bfloat16"]["val_loss"] - fp32) / fp32
    return out


def throughput(names: list[str], steps: int, quick: bool, compile_: bool, peaks: dict,
               rounds: int, device: str = "cpu") -> list[dict]:
    rows = []
    for name in names:
        c = CONFIGS[name]
        n_steps = steps or (6 if quick else (12 if name == "small" else 6))
        n_nonemb, n_all = n_params(build_lmlab(c), c)
        for dtype in ("fp32", "bf16"):
            row = {"config": name, "dtype": dtype, **c, "n_params_non_embedding": n_nonemb, "n_params": n_all}
            for mode, compiled in [("eager", False)] + ([("compiled", True)] if compile_ else []):
                tps, memory, per_round = measure(name, dtype, compiled, warmup=2, steps=n_steps, rounds=rounds,
                                                 device=device)
                for kind in ("hf", "lmlab"):
                    row[f"{kind}_{mode}_tok_s"] = tps[kind]
                    row[f"{kind}_{mode}_tok_s_rounds"] = per_round[kind]
                    if device != "cpu":
                        row[f"{kind}_{mode}_peak_gb"] = memory[kind] / 1e9
                    row[f"{kind}_{mode}_mfu"] = 6 * n_nonemb * tps[kind] / peaks[dtype]
                    row[f"{kind}_{mode}_mfu_with_emb"] = 6 * n_all * tps[kind] / peaks[dtype]
                    print(f"{name:>10} {dtype} {mode:>8} {kind:>6}: {tps[kind]:8.0f} tok/s  "
                          f"MFU {row[f'{kind}_{mode}_mfu']:.1%} ({row[f'{kind}_{mode}_mfu_with_emb']:.1%} with emb)",
                          flush=True)
                row[f"ratio_{mode}"] = row[f"lmlab_{mode}_tok_s"] / row[f"hf_{mode}_tok_s"]
                # round r's lmlab over round r's transformers (the two ran back to back)
                row[f"ratio_{mode}_rounds"] = [a / b for a, b in zip(per_round["lmlab"], per_round["hf"], strict=True)]
                row[f"{mode}_load_avg"] = per_round["load"]
            rows.append(row)
    return rows


def markdown(data: dict) -> str:
    peaks, rows, curves = data["peaks"], data["rows"], data["loss_curves"]
    compiled = any("ratio_compiled" in r for r in rows)
    md = ["# Training throughput: lmlab GPT vs transformers GPT2LMHeadModel", "",
          f"Machine: {data['machine']['cpus']} CPUs, {data['machine']['torch_threads']} torch threads, torch "
          f"{data['machine']['torch']}; measured matmul peak fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 "
          f"{peaks['bf16'] / 1e9:.0f} GFLOP/s. Dropout off, AdamW step and grad clipping included, same random "
          "batches, each side alone in a fresh process, in rounds taking turns (tokens/s from the median "
          "step); bf16 = the trainer's autocast (`--train.dtype=bfloat16`) on both sides. MFU = 6·N·tokens/s "
          "over the peak of the dtype (N without embeddings; with embeddings in brackets).", "",
          "| config | dtype | transformers tok/s (MFU) | lmlab tok/s (MFU) | lmlab / transformers |"
          + (" compiled: transformers | compiled: lmlab | ratio |" if compiled else ""),
          "|---|---|---|---|---|" + ("---|---|---|" if compiled else "")]
    for r in rows:
        line = (f"| {r['config']} (L{r['n_layer']} d{r['n_embd']} T{r['block_size']} V{r['vocab_size']} "
                f"B{r['batch_size']}) | {r['dtype']} | {r['hf_eager_tok_s']:,.0f} ({r['hf_eager_mfu']:.0%}, "
                f"{r['hf_eager_mfu_with_emb']:.0%}) | {r['lmlab_eager_tok_s']:,.0f} ({r['lmlab_eager_mfu']:.0%}, "
                f"{r['lmlab_eager_mfu_with_emb']:.0%}) | **{r['ratio_eager']:.2f}x** |")
        if compiled:
            line += (f" {r['hf_compiled_tok_s']:,.0f} | {r['lmlab_compiled_tok_s']:,.0f} | "
                     f"{r['ratio_compiled']:.2f}x |" if "ratio_compiled" in r else " | | |")
        md.append(line)
    if any("ratio_eager_rounds" in r for r in rows):
        md += ["", "Per round (one fresh process per side, back to back; lmlab / transformers of each round's "
               "median steps) and the 1-minute load average before each process started:", ""]
        for r in rows:
            for mode in ("eager", "compiled"):
                if f"ratio_{mode}_rounds" in r:
                    md.append(f"- {r['config']} {r['dtype']} {mode}: "
                              + ", ".join(f"{x:.2f}x" for x in r[f"ratio_{mode}_rounds"])
                              + " (load " + ", ".join(f"{x:.1f}" for x in r[f"{mode}_load_avg"]) + ")")
    for r in rows:
        for mode in ("eager", "compiled"):
            if f"hf_{mode}_peak_gb" in r:
                md.append(f"\nPeak memory, {r['config']} {r['dtype']} {mode}: transformers "
                          f"{r[f'hf_{mode}_peak_gb']:.1f} GB, lmlab {r[f'lmlab_{mode}_peak_gb']:.1f} GB.")
    if curves:
        md += ["", f"Loss curves ({curves.get('steps', 300)} steps, quickstart model on stdlib-docs, "
               f"{curves.get('threads', data['machine']['torch_threads'])} threads): final val loss fp32 "
               f"{curves['float32']['val_loss']:.4f}, bf16 {curves['bfloat16']['val_loss']:.4f} "
               f"(relative difference {curves['val_loss_rel_diff']:.2%}); wall time fp32 "
               f"{curves['float32']['seconds']:.0f} s, bf16 {curves['bfloat16']['seconds']:.0f} s."]
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small config only, fewer steps")
    ap.add_argument("--compile", action="store_true", help="add torch.compile columns")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per side, taking turns")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (cuda: the gpt2-124m-gpu config, no loss curves)")
    ap.add_argument("--name", default="", help="results file name (default: train_throughput[_quick][_cuda])")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one side's step times, as JSON
    ap.add_argument("--curve_steps", type=int, default=300)
    ap.add_argument("--part", choices=("all", "throughput", "curves"), default="all",
                    help="rerun one part; the other is kept from the existing results file")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    gpu = args.device != "cpu"
    name = args.name or ("train_throughput" + ("_quick" if args.quick else "")
                         + (f"_{args.device.split(':')[0]}" if gpu else ""))
    data = {"machine": machine(), "peaks": None, "rows": [], "loss_curves": None}
    if args.part != "all":
        old = Path(__file__).parent / "results" / f"{name}.json"
        if old.is_file():
            data.update({k: v for k, v in json.loads(old.read_text()).items() if k in data})
    if args.part in ("all", "throughput"):
        data["machine"] = machine()
        data["peaks"] = {"fp32": matmul_peak(torch.float32, device=args.device),
                         "bf16": matmul_peak(torch.bfloat16, device=args.device)}
        if gpu:
            data["machine"]["device"] = torch.cuda.get_device_name(args.device)
        print(f"matmul peak: fp32 {data['peaks']['fp32'] / 1e9:.0f} GFLOP/s, "
              f"bf16 {data['peaks']['bf16'] / 1e9:.0f} GFLOP/s")
        names = ["gpt2-124m-gpu"] if gpu else ["small"] if args.quick else ["small", "gpt2-124m"]
        data["rows"] = throughput(names, args.steps, args.quick, args.compile, data["peaks"], args.rounds,
                                  args.device)
    if args.part in ("all", "curves") and not args.quick and not gpu:
        data["loss_curves"] = {**loss_curves(args.curve_steps), "steps": args.curve_steps,
                               "threads": torch.get_num_threads()}
    md = markdown(data)
    j, m = write_results(name, data, md)
    print(md)
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
