"""Scoring speed of SmolLM2-135M-Instruct (the Q4_1 GGUF file): tokens/s and perplexity of lmlab
against `transformers` on the same windows, by the same scoring code.

`lmlab eval MODEL` and `lmlab fewshot` score a GGUF file in its blocks as stored (`lmlab-gguf`: the
file's weights exactly, fp32 activations and arithmetic; lmlab/cli/eval.py, lmlab/eval/harness/lm.py);
`transformers` loads the same file dequantized to float32 (`gguf_file=`), so both compute in fp32 on
the same weights. `lmlab-fp32` (the file dequantized to float32 `nn.Linear`s, `--precision fp32`) is
reported beside them. Every engine goes through `lmlab.eval.perplexity.token_nll` (windows of `--block`
tokens, each scoring its last `--stride`, one window per forward), so only the forward differs.
Engines alternate for `--rounds` rounds; tokens/s is each engine's best round.

    python benchmarks/llm_scoring.py [--threads 1] [--tokens 4096] [--block 1024]
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from llm_inference import gguf_path

ENGINES = ("lmlab-fp32", "lmlab-gguf", "transformers")


def text_ids(n: int) -> tuple[list[int], list[int]]:
    """(bos, n token ids) of real text: the standard library's argparse and json sources, by the GGUF
    file's tokenizer (which gives transformers' ids, tests/test_gguf_smollm2.py)."""
    import json as json_mod

    from lmlab.io.load import load_model

    loaded = load_model(gguf_path(), precision="fp32")
    ids = loaded.tokenizer.encode(inspect.getsource(argparse) + inspect.getsource(json_mod.decoder))
    if len(ids) < n:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than --tokens {n}")
    return list(loaded.bos), ids[:n]


def load(engine: str) -> torch.nn.Module:
    if engine == "transformers":
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.logging.set_verbosity_error()
        path = gguf_path()
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    from lmlab.io.load import load_model

    return load_model(gguf_path(), precision=engine.removeprefix("lmlab-")).model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=0, help="scored tokens per window (default: --block)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--note", default="", help="how loaded the machine was (written into the results)")
    ap.add_argument("--out", default="llm_scoring")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from common import RESULTS, machine

    from lmlab.eval.perplexity import token_nll
    from lmlab.utils.atomic import atomic_write_text

    torch.set_num_threads(args.threads)
    bos, ids = text_ids(args.tokens + 1)
    if not bos:  # as `score_text`: with no BOS the first token is only context
        bos, ids = ids[:1], ids[1:]
    ids = ids[:args.tokens]
    tokens = torch.tensor(ids).numpy()
    stride = args.stride or args.block
    engines = [e for e in args.engines.split(",") if e]
    models = {e: load(e) for e in engines}
    best: dict[str, float] = {}
    nll: dict[str, float] = {}
    with torch.no_grad():
        for e in engines:  # warm-up: one window
            token_nll(models[e], tokens[:args.block], bos=bos[0], block_size=args.block, batch_size=1)
        for _ in range(args.rounds):
            for e in engines:
                t0 = time.perf_counter()
                out = token_nll(models[e], tokens, bos=bos[0], block_size=args.block, stride=stride, batch_size=1)
                dt = time.perf_counter() - t0
                best[e] = max(best.get(e, 0.0), len(tokens) / dt)
                nll[e] = float(out.mean())
                print(f"{e}: {len(tokens) / dt:.0f} tok/s, perplexity {math.exp(nll[e]):.4f}", flush=True)
    ref = best.get("transformers")
    rows = {e: {"tok_s": best[e], "mean_nll": nll[e], "perplexity": math.exp(nll[e]),
                "vs_transformers": best[e] / ref if ref else None} for e in engines}
    data = {"tokens": len(tokens), "block": args.block, "stride": stride, "threads": args.threads,
            "rounds": args.rounds, "engines": rows, "note": args.note,
            "machine": {**machine(), "load_average": os.getloadavg()}}
    lines = ["# Scoring SmolLM2-135M-Instruct (Q4_1 GGUF) on CPU", "",
             f"{len(tokens)} tokens of real text (argparse and json.decoder sources) in windows of {args.block} "
             f"tokens scoring their last {stride}, one window per forward, {args.threads} thread(s); "
             f"best of {args.rounds} alternating rounds. All engines through lmlab's `token_nll`.", "",
             f"Measured on a shared machine: {args.note}", "",
             "| engine | tokens/s | / transformers | perplexity |", "|---|---|---|---|"]
    for e, r in rows.items():
        ratio = f"{r['vs_transformers']:.2f}" if r["vs_transformers"] else ""
        lines.append(f"| {e} | {r['tok_s']:.0f} | {ratio} | {r['perplexity']:.4f} |")
    lines += ["", f"Machine: {data['machine']}", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / f"{args.out}.json", json.dumps(data, indent=2) + "\n")
    atomic_write_text(RESULTS / f"{args.out}.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
