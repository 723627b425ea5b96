"""lmlab's n-gram LM against its peers on one text: KenLM (`lmplz`, the `kenlm` module) and NLTK.

Default text: the King James Bible from Debian's `bible-kjv` (`bible -f Gen1:1-Rev22:21`, one verse
a line, ~790k words); every 10th verse is held out. For orders 3 and 5 it measures
  * build: lmlab counting + smoothing (ARPA writing apart) vs lmplz (which always writes ARPA),
    wall time and peak RSS, each in a fresh child process;
  * query: tokens/s scoring the held-out verses from the same ARPA file, lmlab's batch scorer vs
    the kenlm module's Model.score in a Python loop; and the test perplexity of both;
  * NLTK's KneserNeyInterpolated: fit time, and tokens/s on a sample of the test tokens.

    python benchmarks/ngram_peers.py                 # ~3 min on 2 cores (NLTK is most of it)
    python benchmarks/ngram_peers.py --text FILE --no-nltk
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_results  # noqa: E402


def kjv_lines() -> list[str]:
    if shutil.which("bible") is None:
        sys.exit("needs Debian's bible-kjv (apt-get install bible-kjv) or --text FILE")
    out = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    return [re.sub(r"^\S+?\d+:\d+\s+", "", line).strip() for line in out.splitlines() if line.strip()]


def in_child(fn: str, *args) -> dict:
    """Run `fn(*args)` of this file in a fresh Python process; returns its JSON plus its peak RSS."""
    code = f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import ngram_peers as b; " \
           f"print(json.dumps(b.{fn}(*{args!r})))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise RuntimeError(f"{fn} failed")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def lmlab_build(train: str, order: int, arpa: str) -> dict:
    import resource

    from lmlab.io.arpa import write_arpa
    from lmlab.models.ngram.model import NGramConfig, NGramModel

    imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = Path(train).read_text(encoding="utf-8").splitlines()
    t = time.perf_counter()
    model = NGramModel.from_text(lines, NGramConfig(order=order))
    build = time.perf_counter() - t
    t = time.perf_counter()
    write_arpa(model, arpa)
    return {"build_s": build, "arpa_write_s": time.perf_counter() - t, "import_rss_mib": round(imports),
            **model.timings}


def lmplz_build(train: str, order: int, arpa: str, tmp: str) -> dict:
    t = time.perf_counter()
    with open(train, "rb") as fin, open(arpa, "wb") as fout:
        subprocess.run([shutil.which("lmplz") or "/usr/local/bin/lmplz", "-o", str(order), "-S", "1G", "-T", tmp],
                       stdin=fin, stdout=fout, stderr=subprocess.DEVNULL, check=True)
    return {"build_s": time.perf_counter() - t}


def query(arpa: str, test: str) -> dict:
    import kenlm
    import numpy as np

    from lmlab.io.arpa import read_arpa

    lines = Path(test).read_text(encoding="utf-8").splitlines()
    tokens = sum(len(s.split()) + 1 for s in lines)
    ours = read_arpa(arpa)
    t = time.perf_counter()
    ppl = ours.perplexity(lines)
    ours_s = time.perf_counter() - t
    ref = kenlm.Model(arpa)
    t = time.perf_counter()
    theirs = [ref.score(s, bos=True, eos=True) for s in lines]
    kenlm_s = time.perf_counter() - t
    diff = float(np.abs(ours.score_batch(lines) - np.array(theirs)).max())
    return {"tokens": tokens, "lmlab_tok_s": tokens / ours_s, "kenlm_tok_s": tokens / kenlm_s,
            "lmlab_ppl": ppl.perplexity, "kenlm_ppl": 10 ** (-sum(theirs) / tokens), "max_sentence_diff": diff}


def nltk_run(train: str, test: str, order: int, sample_tokens: int) -> dict:
    from nltk.lm import KneserNeyInterpolated
    from nltk.lm.preprocessing import padded_everygram_pipeline

    sents = [s.split() for s in Path(train).read_text(encoding="utf-8").splitlines()]
    t = time.perf_counter()
    lm = KneserNeyInterpolated(order)
    lm.fit(*padded_everygram_pipeline(order, sents))
    fit = time.perf_counter() - t
    queries = []
    for s in Path(test).read_text(encoding="utf-8").splitlines():
        padded = ["<s>"] * (order - 1) + s.split() + ["</s>"]
        queries += [(padded[i], padded[i - order + 1:i]) for i in range(order - 1, len(padded))]
    queries = queries[:sample_tokens]
    t = time.perf_counter()
    for w, ctx in queries:
        lm.logscore(w, ctx)
    return {"fit_s": fit, "tok_s": len(queries) / (time.perf_counter() - t), "sample_tokens": len(queries)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", help="one sentence per line (default: the King James Bible)")
    ap.add_argument("--orders", default="3,5")
    ap.add_argument("--no-nltk", action="store_true")
    ap.add_argument("--nltk-sample", type=int, default=60, help="test tokens NLTK scores per order")
    ap.add_argument("--name", default="ngram_peers")
    args = ap.parse_args()
    lines = Path(args.text).read_text(encoding="utf-8").splitlines() if args.text else kjv_lines()
    work = Path(tempfile.mkdtemp(prefix="ngram_peers_"))
    try:
        train, test = work / "train.txt", work / "test.txt"
        train.write_text("\n".join(s for i, s in enumerate(lines) if i % 10) + "\n", encoding="utf-8")
        test.write_text("\n".join(s for i, s in enumerate(lines) if i % 10 == 0) + "\n", encoding="utf-8")
        result = {"text": args.text or "King James Bible (bible-kjv)", "words": sum(len(s.split()) for s in lines),
                  "lines": len(lines), "orders": {}, "machine": machine()}
        for order in map(int, args.orders.split(",")):
            r = {"lmlab": in_child("lmlab_build", str(train), order, str(work / "ours.arpa"))}
            if shutil.which("lmplz") or os.access("/usr/local/bin/lmplz", os.X_OK):
                r["lmplz"] = in_child("lmplz_build", str(train), order, str(work / "lmplz.arpa"), str(work))
            r["query"] = in_child("query", str(work / "ours.arpa"), str(test))
            if not args.no_nltk:
                r["nltk"] = in_child("nltk_run", str(train), str(test), order, args.nltk_sample)
            result["orders"][order] = r
            print(json.dumps({order: r}, indent=1), flush=True)
        write_results(args.name, result, markdown(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def markdown(r: dict) -> str:
    m = r["machine"]
    out = [f"# n-gram LM vs KenLM and NLTK: {r['text']}, {r['words']:,} words, {r['lines']:,} lines",
           "", f"Machine: {m['cpus']} CPUs, Python {m['python']}. Every 10th line held out for the query test. "
           "Build = counting + modified Kneser-Ney smoothing; lmplz's figure includes writing its ARPA file, "
           "lmlab's ARPA writing is the next column. Peak RSS per process; lmlab's includes "
           f"{next(iter(r['orders'].values()))['lmlab'].get('import_rss_mib', '?')} MiB of imports (torch).", "",
           "| order | lmlab build | lmplz | lmlab / lmplz | lmlab ARPA write | lmlab query tok/s | kenlm tok/s | "
           "test ppl lmlab / kenlm | NLTK fit | NLTK tok/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for order, o in r["orders"].items():
        ours, lp, q, nl = o["lmlab"], o.get("lmplz", {}), o["query"], o.get("nltk", {})
        ratio = f"{ours['build_s'] / lp['build_s']:.2f}x" if lp else "-"
        out.append(
            f"| {order} | {ours['build_s']:.2f} s, {ours['peak_rss_mib']} MiB | "
            + (f"{lp['build_s']:.2f} s, {lp['peak_rss_mib']} MiB" if lp else "-")
            + f" | {ratio} | {ours['arpa_write_s']:.2f} s | {q['lmlab_tok_s']:,.0f} | {q['kenlm_tok_s']:,.0f} | "
            f"{q['lmlab_ppl']:.2f} / {q['kenlm_ppl']:.2f} | "
            + (f"{nl['fit_s']:.1f} s | {nl['tok_s']:.1f} ({nl['sample_tokens']} tokens)" if nl else "- | -") + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
