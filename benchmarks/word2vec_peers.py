"""lmlab's word2vec against gensim's on the same sentences with the same hyper-parameters.

Corpora: the King James Bible from Debian's `bible-kjv` (`bible -f Gen1:1-Rev22:21`, one verse a
sentence, references dropped, ~790k words) and the built-in stdlib-docs corpus (a document a sentence).
For each corpus and for skip-gram and CBOW (gensim's defaults otherwise, workers=2), it measures
  * training words/s (corpus words x epochs / wall time of `train`, vocabulary building apart;
    the runs alternate gensim, lmlab, gensim so that load from other processes hits both);
  * the mean overlap of the top-10 neighbours of the 1,000 most frequent words: lmlab vs each gensim
    run (seeds 1 and 2), against gensim seed 1 vs gensim seed 2 (the issue asks for >= 0.9x);
  * analogy accuracy on covered questions (questions-words.txt) and WordSim-353 Spearman, both.

    python benchmarks/word2vec_peers.py               # ~3-4 min on 2 cores
    python benchmarks/word2vec_peers.py --quick       # skip-gram only
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_results  # noqa: E402

from lmlab.data.sentences import read_sentences  # noqa: E402
from lmlab.eval.word_vectors import evaluate_analogies, evaluate_word_pairs, gensim_test_file  # noqa: E402
from lmlab.models.word2vec.keyed_vectors import KeyedVectors, neighbour_overlap  # noqa: E402
from lmlab.models.word2vec.model import Word2Vec, Word2VecConfig, tokenize

WORKERS = 2


def kjv_sentences() -> list[list[str]]:
    if shutil.which("bible") is None:
        sys.exit("needs Debian's bible-kjv (apt-get install bible-kjv)")
    out = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    return [tokenize(re.sub(r"^\S+?\d+:\d+\s+", "", line)) for line in out.splitlines() if line.strip()]


def gensim_run(sentences, sg: int, seed: int) -> tuple[KeyedVectors, float]:
    from gensim.models import Word2Vec as G

    g = G(vector_size=100, sg=sg, window=5, min_count=5, sample=1e-3, negative=5, epochs=5, workers=WORKERS,
          seed=seed)
    g.build_vocab(sentences)
    t0 = time.perf_counter()
    g.train(sentences, total_examples=g.corpus_count, epochs=g.epochs)
    dt = time.perf_counter() - t0
    return KeyedVectors(g.wv.index_to_key, g.wv.vectors), g.corpus_total_words * g.epochs / dt


def lmlab_run(sentences, sg: int, seed: int) -> tuple[KeyedVectors, float]:
    m = Word2Vec(Word2VecConfig(vector_size=100, sg=sg, window=5, min_count=5, sample=1e-3, negative=5, epochs=5,
                                workers=WORKERS, seed=seed))
    m.build_vocab(sentences)
    return m.wv, m.train(sentences).words_per_second


def quality(kv: KeyedVectors) -> dict:
    a = evaluate_analogies(kv, gensim_test_file("questions-words.txt"))
    w = evaluate_word_pairs(kv, gensim_test_file("wordsim353.tsv"))
    return {"analogy_accuracy": a.accuracy, "analogy_covered": a.covered, "analogy_questions": a.questions,
            "wordsim_spearman": w.spearman, "wordsim_covered": w.covered}


def compare(name: str, sentences, sg: int) -> dict:
    g1, g1_speed = gensim_run(sentences, sg, seed=1)
    ours, ours_speed = lmlab_run(sentences, sg, seed=1)
    g2, g2_speed = gensim_run(sentences, sg, seed=2)
    ours_vs = [neighbour_overlap(ours, g, 1000) for g in (g1, g2)]
    gg = neighbour_overlap(g1, g2, 1000)
    row = {"corpus": name, "sg": sg, "words": sum(map(len, sentences)), "vocab": len(ours),
           "lmlab_words_per_s": ours_speed, "gensim_words_per_s": (g1_speed + g2_speed) / 2,
           "overlap_lmlab_vs_gensim": sum(ours_vs) / 2, "overlap_gensim_vs_gensim": gg,
           "lmlab": quality(ours), "gensim": quality(g1)}
    row["speed_ratio"] = row["lmlab_words_per_s"] / row["gensim_words_per_s"]
    row["overlap_ratio"] = row["overlap_lmlab_vs_gensim"] / gg
    print(f"{name} {'skip-gram' if sg else 'CBOW'}: lmlab {ours_speed:,.0f} words/s, gensim "
          f"{row['gensim_words_per_s']:,.0f} (x{row['speed_ratio']:.2f}); neighbour overlap "
          f"{row['overlap_lmlab_vs_gensim']:.3f} vs gensim-gensim {gg:.3f} (x{row['overlap_ratio']:.3f})", flush=True)
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# word2vec: lmlab vs gensim", "",
             f"Same sentences and hyper-parameters (vector_size 100, window 5, min_count 5, sample 1e-3, "
             f"negative 5, epochs 5), workers={WORKERS}; gensim {meta['gensim']}, numba {meta['numba']}. "
             "Neighbour overlap: mean shared fraction of the top-10 neighbours of the 1,000 most frequent "
             "words. Analogies: accuracy on covered questions of questions-words.txt. `python "
             "benchmarks/word2vec_peers.py`.", "",
             "| corpus | model | words | lmlab words/s | gensim words/s | ratio | overlap lmlab-gensim | "
             "gensim-gensim | ratio | analogies lmlab / gensim (covered) | wordsim353 ρ lmlab / gensim |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['corpus']} | {'skip-gram' if r['sg'] else 'CBOW'} | {r['words']:,} | "
            f"{r['lmlab_words_per_s']:,.0f} | "
            f"{r['gensim_words_per_s']:,.0f} | {r['speed_ratio']:.2f} | {r['overlap_lmlab_vs_gensim']:.3f} | "
            f"{r['overlap_gensim_vs_gensim']:.3f} | {r['overlap_ratio']:.3f} | {r['lmlab']['analogy_accuracy']:.3f} / "
            f"{r['gensim']['analogy_accuracy']:.3f} ({r['lmlab']['analogy_covered']}) | "
            f"{r['lmlab']['wordsim_spearman']:.3f} / {r['gensim']['wordsim_spearman']:.3f} "
            f"({r['lmlab']['wordsim_covered']} pairs) |")
    lines += ["", f"Machine: {meta['machine']['processor'] or meta['machine']['platform']}, "
              f"{meta['machine']['cpus']} CPUs (shared with other jobs while measured).", ""]
    return "\n".join(lines)


def main() -> None:
    import gensim
    import numba

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip-gram only")
    args = ap.parse_args()
    lmlab_run([["warm", "up", "the", "kernel"]] * 10, 1, 1)  # compile (or load) the numba kernel first
    corpora = {"kjv": kjv_sentences(), "stdlib-docs": read_sentences("stdlib-docs")}
    rows = [compare(name, sents, sg) for name, sents in corpora.items() for sg in ((1,) if args.quick else (1, 0))]
    meta = {"machine": machine(), "gensim": gensim.__version__, "numba": numba.__version__}
    j, m = write_results("word2vec_peers", {"rows": rows, **meta}, markdown(rows, meta))
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
