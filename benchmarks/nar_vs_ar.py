"""Autoregressive (BART) against non-autoregressive (mask-predict) decoding on tasks lmlab makes itself.

The tasks: reverse, and sort, a sequence of 4-8 words from a 26-word vocabulary (lmlab/data/synthetic.py).
Per task, a BART and a conditional masked LM (lmlab/models/transformer/cmlm.py) of the same shape are trained on the
same pairs for the same number of steps through the one Trainer (`data.seq2seq`), then decode a
held-out set in batches: BART greedy and beam search (4 beams), mask-predict with T = 1, 4 and 10 iterations. Reported:
exact match, token accuracy, tokens/s (output tokens over wall time, best of `--reps`), and each
method's speed-up and exact-match gap against BART greedy.

    python benchmarks/nar_vs_ar.py                # a few minutes on 2 idle CPU cores
    python benchmarks/nar_vs_ar.py --steps 100 --n_test 100 --name nar_vs_ar_quick   # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine  # noqa: E402

from lmlab.config import apply_overrides  # noqa: E402
from lmlab.data.prepare import PrepareConfig, prepare  # noqa: E402
from lmlab.data.synthetic import word_pairs, write_jsonl  # noqa: E402
from lmlab.generate.nar import MaskPredictConfig, mask_predict  # noqa: E402
from lmlab.generate.seq2seq import Seq2SeqConfig, decode_outputs, encode_sources, generate  # noqa: E402
from lmlab.models.registry import preset  # noqa: E402
from lmlab.train.checkpoint import load_checkpoint  # noqa: E402
from lmlab.train.config import RunConfig  # noqa: E402
from lmlab.train.trainer import Trainer  # noqa: E402
from lmlab.utils.atomic import atomic_write_text  # noqa: E402

SHAPE = {"n_layer": 2, "n_dec_layer": 2, "n_head": 4, "n_embd": 128, "mlp_hidden": 512, "block_size": 16,
         "dropout": 0.0}


def train(family: str, data: Path, pairs: Path, out: Path, args) -> tuple[torch.nn.Module, dict]:
    cfg = RunConfig()
    cfg.model = preset(f"{family}-tiny")
    overrides = [f"model.{k}={v}" for k, v in SHAPE.items()] + [
        f"data.dir={data}", f"data.seq2seq={pairs}", f"train.out_dir={out}", f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch_size}", "train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=100",
        f"train.eval_interval={args.steps}", "train.eval_iters=4", "train.log_interval=50", "train.progress=false",
        f"train.dtype={args.dtype}", f"train.threads={args.threads}", f"train.ckpt_interval={args.steps}"]
    cfg = apply_overrides(cfg, overrides)
    trainer = Trainer(cfg, out, quiet=True)
    t0 = time.perf_counter()
    summary = trainer.fit()
    seconds = time.perf_counter() - t0
    model, _, _, _ = load_checkpoint(out)
    info = {"params": sum(p.numel() for p in model.parameters()), "train_seconds": round(seconds, 1),
            "final_train_loss": round(summary["loss"], 4), "val_loss": round(summary.get("val_loss", float("nan")), 4)}
    print(f"{family}: {info}", flush=True)
    return model, info


def timed(fn, reps: int):
    best, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def score(hyps: list[list[str]], refs: list[list[str]]) -> dict:
    exact = sum(h == r for h, r in zip(hyps, refs)) / len(refs)
    correct = sum(sum(a == b for a, b in zip(h, r)) for h, r in zip(hyps, refs))
    return {"exact_match": exact, "token_accuracy": correct / sum(len(r) for r in refs),
            "length_accuracy": sum(len(h) == len(r) for h, r in zip(hyps, refs)) / len(refs)}


def evaluate(bart, cmlm, tok, test: list[dict], args) -> list[dict]:
    sources = [p["source"] for p in test]
    refs = [p["target"].split() for p in test]
    rows = []

    def run(name: str, decode) -> None:
        hyps: list[list[str]] = []

        def all_batches():
            hyps.clear()
            for i in range(0, len(sources), args.eval_batch):
                x, mask = encode_sources(tok, sources[i:i + args.eval_batch], SHAPE["block_size"])
                hyps.extend(t.split() for t in decode(x, mask))

        _, seconds = timed(all_batches, args.reps)
        n_tokens = sum(len(h) for h in hyps)
        row = {"method": name, **score(hyps, refs), "seconds": seconds, "tokens_per_s": n_tokens / seconds}
        rows.append(row)
        print(f"{name}: EM {row['exact_match']:.3f}, tok acc {row['token_accuracy']:.3f}, "
              f"{row['tokens_per_s']:,.0f} tok/s", flush=True)

    for beams in (1, 4):
        cfg = Seq2SeqConfig(max_new_tokens=12, num_beams=beams)
        run("BART greedy" if beams == 1 else f"BART beam {beams}",
            lambda x, m, cfg=cfg: decode_outputs(tok, generate(bart, x, cfg, attention_mask=m)))
    for T in (1, 4, 10):
        def nar(x, m, T=T):
            out = mask_predict(cmlm, x, MaskPredictConfig(iterations=T), attention_mask=m)
            return [tok.decode(r[:n], skip_special=True) for r, n in zip(out.tokens.tolist(), out.lengths.tolist())]
        run(f"mask-predict T={T}", nar)
    base = rows[0]
    for r in rows:
        r["speedup_vs_greedy"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["exact_match_gap_vs_greedy"] = r["exact_match"] - base["exact_match"]
    return rows


def markdown(result: dict) -> str:
    a = result["args"]
    lines = ["# Autoregressive (BART) vs non-autoregressive (mask-predict) decoding", "",
             f"Tasks: reverse or sort 4-8 words from a 26-word vocabulary; {a['n_train']:,} training pairs and "
             f"{a['n_test']} held-out pairs per task. Both models {SHAPE['n_layer']}+{SHAPE['n_dec_layer']} layers, "
             f"width {SHAPE['n_embd']}, {SHAPE['n_head']} heads, trained {a['steps']} steps of batch "
             f"{a['batch_size']} ({a['dtype']}) through the one Trainer. Decoding in batches of {a['eval_batch']} "
             f"on {a['threads']} thread(s); tokens/s = output tokens / wall time (best of {a['reps']}). The "
             "machine was shared with other jobs, so absolute speeds are noisy; the ratios come from "
             "back-to-back runs. The CMLM's validation loss counts masked tokens only.", ""]
    for task, t in result["tasks"].items():
        b, c = t["bart"], t["cmlm"]
        lines += [f"## {task}", "",
                  f"BART {b['params']:,} parameters, trained in {b['train_seconds']} s, val loss {b['val_loss']}; "
                  f"CMLM {c['params']:,} parameters, trained in {c['train_seconds']} s, val loss {c['val_loss']}.", "",
                  "| method | exact match | token acc. | length acc. | tokens/s | speed-up vs greedy "
                  "| EM gap vs greedy |",
                  "|---|---|---|---|---|---|---|"]
        for r in t["rows"]:
            lines.append(f"| {r['method']} | {r['exact_match']:.3f} | {r['token_accuracy']:.3f} | "
                         f"{r['length_accuracy']:.3f} | {r['tokens_per_s']:,.0f} | {r['speedup_vs_greedy']:.2f}x | "
                         f"{r['exact_match_gap_vs_greedy']:+.3f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--n_train", type=int, default=20000)
    p.add_argument("--n_test", type=int, default=500)
    p.add_argument("--eval_batch", type=int, default=100)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tasks", default="reverse,sort")
    p.add_argument("--name", default="nar_vs_ar")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from lmlab.tokenizers import load_tokenizer

    tasks = {}
    for task in args.tasks.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            train_pairs = word_pairs(task, args.n_train, seed=0)
            seen = {q["source"] for q in train_pairs}
            test = [q for q in word_pairs(task, 2 * args.n_test, seed=1) if q["source"] not in seen][:args.n_test]
            pairs = write_jsonl(train_pairs, root / "pairs.jsonl")
            prepare(PrepareConfig(source=str(pairs), jsonl_field="source", out=str(root / "data"), tokenizer="word",
                                  min_count=1, vocab_size=0))
            print(f"== {task}", flush=True)
            bart, bart_info = train("bart", root / "data", pairs, root / "bart", args)
            cmlm, cmlm_info = train("cmlm", root / "data", pairs, root / "cmlm", args)
            with torch.no_grad():
                rows = evaluate(bart, cmlm, load_tokenizer(root / "data"), test, args)
        tasks[task] = {"bart": bart_info, "cmlm": cmlm_info, "rows": rows}
    result = {"machine": machine(), "args": vars(args), "shape": SHAPE, "tasks": tasks}
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / f"{args.name}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(RESULTS / f"{args.name}.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
