"""Build a modified Kneser-Ney 5-gram on a synthetic corpus: wall time per phase and peak memory.

The corpus: Zipfian word ids over a 50k vocabulary with Markov structure (see `synthetic_ids`),
in sentences of geometric length (mean 20). It is generated in a child process and handed over as a .npy file, so
the peak RSS reported (resource.getrusage) is the build's: the token array plus the counting and
estimation arrays. Optionally also times KenLM's `lmplz` on the same text (`--lmplz`, needs
.ci/build_kenlm.sh) and writing the ARPA file (`--arpa`).

    python benchmarks/ngram_scale.py --tokens 10_000_000 --name ngram_scale_10m   # ~1 min
    python benchmarks/ngram_scale.py                                              # 100M tokens
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_results  # noqa: E402

SPECIALS = ["<unk>", "<s>", "</s>"]


def synthetic_ids(n_tokens: int, vocab: int, seed: int, head: int = 2000, mean_len: int = 20) -> np.ndarray:
    """Token ids (words 3..vocab-1, `</s>`=2 closing each sentence), built in 10M-token chunks.

    Ranks follow a Zipf law (p ~ 1/rank, truncated at the vocabulary). A head rank is shifted by an
    amount that depends on the previous draw (a hidden first-order Markov chain, so n-grams repeat).
    A tail word is always emitted right after one of its own 1-6 head "parent" words and never opens
    a sentence, so, as in real text, rare words have one or a few left contexts: without that, a
    closed vocabulary seen 100M times has no unigram continuation counts of 1-3, and modified
    Kneser-Ney's unigram discounts cannot be estimated (lmplz would stop too)."""
    rng = np.random.default_rng(seed)
    n_words = vocab - len(SPECIALS)
    cdf = np.cumsum(1.0 / np.arange(1, n_words + 1))
    cdf /= cdf[-1]
    perm = rng.permutation(n_words).astype(np.int32)  # rank -> word, spreading frequent words over ids
    parents = rng.integers(0, head, (n_words, 6))
    n_parents = rng.choice(np.arange(1, 7), n_words, p=[0.4, 0.25, 0.15, 0.1, 0.05, 0.05])
    out = np.empty(n_tokens, dtype=np.int32)
    no_end = np.zeros(n_tokens, dtype=bool)  # a parent whose tail word follows: no sentence end here
    filled, prev = 0, 0
    while filled < n_tokens:
        n = min(10_000_000, n_tokens - filled)
        z = np.minimum(np.searchsorted(cdf, rng.random(n)), n_words - 1)
        zprev = np.concatenate([[prev], z[:-1]])
        prev = int(z[-1])
        is_head = z < head
        rank = np.where(is_head, (z + zprev * 7919) % head, z)
        tail = ~is_head
        # each tail word becomes two tokens: its parent, then itself
        pos = np.arange(n) + np.cumsum(tail)
        chunk = np.empty(n + int(tail.sum()), dtype=np.int32)
        chunk[pos] = rank
        which = rng.integers(0, 6, int(tail.sum())) % n_parents[rank[tail]]
        chunk[pos[tail] - 1] = parents[rank[tail], which]
        guard = np.zeros(len(chunk), dtype=bool)
        guard[pos[tail] - 1] = True
        take = min(len(chunk), n_tokens - filled)
        out[filled:filled + take] = perm[chunk[:take]] + len(SPECIALS)
        no_end[filled:filled + take] = guard[:take]
        filled += take
    ends = (rng.random(n_tokens) < 1.0 / mean_len) & ~no_end
    ends[-1] = True
    out[ends] = 2
    return out


def _generate(args) -> None:
    ids = synthetic_ids(args.tokens, args.vocab, args.seed)
    np.save(args.gen_out, ids)


def peak_rss_mib(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=lambda s: int(float(s.replace("_", ""))), default=100_000_000)
    ap.add_argument("--order", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lmplz", action="store_true", help="also time KenLM's lmplz on the same text")
    ap.add_argument("--arpa", action="store_true", help="also time writing the ARPA file")
    ap.add_argument("--name", default="ngram_scale")
    ap.add_argument("--note", default="", help="a line for the markdown, e.g. what else ran meanwhile")
    ap.add_argument("--gen-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gen_out:
        return _generate(args)

    from lmlab.models.ngram.model import NGramConfig, NGramModel

    work = Path(tempfile.mkdtemp(prefix="ngram_scale_"))
    try:
        t = time.perf_counter()
        data = work / "ids.npy"
        subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
                        "--seed", str(args.seed), "--gen-out", str(data)], check=True)
        gen_s = time.perf_counter() - t
        ids = np.load(data)
        itos = SPECIALS + [f"w{i}" for i in range(len(SPECIALS), args.vocab)]
        rss0 = peak_rss_mib()
        t = time.perf_counter()
        model = NGramModel.from_ids(ids, NGramConfig(order=args.order), itos=itos, eos_id=2)
        build_s = time.perf_counter() - t
        rss = peak_rss_mib()
        result = {
            "tokens": int(len(ids)), "sentences": int((ids == 2).sum()), "order": args.order,
            "vocab": len(model.vocab), "ngrams": [int(len(k)) for k in model.keys],
            "generate_s": round(gen_s, 1), "build_s": round(build_s, 1),
            "phases_s": {k: round(v, 1) for k, v in model.timings.items()},
            "prepare_s": round(build_s - sum(model.timings.values()), 1),
            "peak_rss_mib": round(rss), "peak_rss_before_build_mib": round(rss0),
            "discounts": model.discounts.round(4).tolist(), "machine": machine(), "note": args.note,
        }
        print(json.dumps(result, indent=2), flush=True)
        if args.arpa or args.lmplz:
            t = time.perf_counter()
            from lmlab.io.arpa import write_arpa
            write_arpa(model, work / "ours.arpa")
            result["arpa_write_s"] = round(time.perf_counter() - t, 1)
            result["arpa_mib"] = round((work / "ours.arpa").stat().st_size / 2**20)
        del model
        if args.lmplz:
            result["lmplz"] = _time_lmplz(ids, itos, args.order, work)
        print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
        write_results(args.name, result, _markdown(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _time_lmplz(ids: np.ndarray, itos: list[str], order: int, work: Path) -> dict:
    lmplz = shutil.which("lmplz") or os.path.join(os.environ.get("KENLM_BIN", "/usr/local/bin"), "lmplz")
    if not os.access(lmplz, os.X_OK):
        return {"skipped": "lmplz not found (run .ci/build_kenlm.sh)"}
    text = work / "corpus.txt"
    words = np.array(itos, dtype=object)
    words[2] = "\n"  # </s> ends a line; the spaces around it are whitespace to lmplz
    with open(text, "w") as f:
        for lo in range(0, len(ids), 1_000_000):
            f.write(" ".join(words[ids[lo:lo + 1_000_000]]) + " ")
    t = time.perf_counter()
    with open(text) as fin, open(work / "lmplz.arpa", "w") as fout:
        subprocess.run([lmplz, "-o", str(order), "-S", "60%", "-T", str(work)], stdin=fin, stdout=fout,
                       stderr=subprocess.DEVNULL, check=True)
    return {"wall_s": round(time.perf_counter() - t, 1), "peak_rss_mib": round(peak_rss_mib(resource.RUSAGE_CHILDREN)),
            "note": "includes writing its ARPA file"}


def _markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"# n-gram build at scale: modified Kneser-Ney {r['order']}-gram, {r['tokens']:,} synthetic tokens",
        "",
        f"Machine: {m['cpus']} CPUs, Python {m['python']}. Zipfian ids over a {r['vocab'] - 3:,}-word vocabulary with "
        f"Markov structure, {r['sentences']:,} sentences. Peak RSS of the building process (resource.getrusage), "
        "which holds the token array too." + (f" {r['note']}" if r.get("note") else ""),
        "",
        "| n-grams per order | build (s) | prepare / count / estimate (s) | peak RSS |",
        "|---|---|---|---|",
        f"| {' / '.join(f'{n:,}' for n in r['ngrams'])} | {r['build_s']} | {r['prepare_s']} / "
        f"{r['phases_s'].get('count_s')} / {r['phases_s'].get('estimate_s')} | {r['peak_rss_mib'] / 1024:.2f} GiB |",
    ]
    if "arpa_write_s" in r:
        lines += ["", f"Writing the ARPA file ({r['arpa_mib']:,} MiB) took {r['arpa_write_s']} s more."]
    if "lmplz" in r:
        lp = r["lmplz"]
        lines += ["", f"KenLM lmplz on the same text: {lp.get('wall_s', '-')} s, peak RSS "
                  f"{lp.get('peak_rss_mib', 0) / 1024:.2f} GiB ({lp.get('note', lp.get('skipped', ''))})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
