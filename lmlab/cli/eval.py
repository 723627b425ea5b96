"""`lmlab eval MODEL`: loss, perplexity and bits per byte (lmlab/eval/perplexity.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmlab.cli._args import add_precision, model_argument, take_model
from lmlab.errors import LmlabError


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from lmlab.io.load import load_model, model_kind

    path = take_model(args, "eval")
    kind = model_kind(path)
    if kind == "arpa":
        raise LmlabError(f"score text with an ARPA n-gram model by `lmlab ngram query {path} --data FILE.txt`")
    text_file = args.data is not None and Path(args.data).is_file()
    if kind in ("lmlab", "hf") and not text_file:
        loaded = load_model(path)
        if loaded.objective in ("classify", "caption", "classify_text"):  # a classifier: a prepared split
            out = _eval_images(args, loaded)
            if args.json:
                from lmlab.utils.atomic import atomic_write_text

                atomic_write_text(args.json, json.dumps(out, indent=2))
            return 0
    if kind != "lmlab" and not text_file:
        raise LmlabError(f"{path} brings its own tokenizer: give --data FILE.txt, a UTF-8 text file to score")
    # a GGUF file in its blocks as stored (fp32 arithmetic: logits within ~1e-4 of its fp32 dequantization,
    # docs/gguf/README.md); lmlab and HF weights as stored; --precision to choose
    loaded = load_model(path, precision=args.precision)
    out = _eval_text_file(args, loaded) if text_file else _eval_split(args, loaded)
    if args.json:
        from lmlab.utils.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(out, indent=2))
    return 0


def _eval_split(args: argparse.Namespace, loaded) -> dict:
    import torch

    from lmlab.data.stream import TokenSplit
    from lmlab.eval.perplexity import evaluate_split, unigram_baseline

    model = loaded.model
    data_dir = args.data or (loaded.run_config or {}).get("data", {}).get("dir")
    if not data_dir:
        raise LmlabError(f"{loaded.path}: no data directory recorded; give --data DIR or --data FILE.txt")
    split = TokenSplit(data_dir, args.split)
    if split.meta["vocab_size"] > model.config.vocab_size:
        raise LmlabError(f"{data_dir} was tokenized with a larger vocabulary than the model's")
    res = evaluate_split(model, split, block_size=model.config.block_size, stride=args.stride,
                         batch_size=args.batch_size, max_tokens=args.max_tokens,
                         autocast_dtype=torch.bfloat16 if args.bf16 else None)
    out = {"checkpoint": str(loaded.checkpoint or loaded.path), "data": str(data_dir), **res.as_dict()}
    print(f"{out['checkpoint']} on {data_dir} [{args.split}]: {res.tokens:,} tokens, loss {res.loss:.4f}, "
          f"perplexity {res.perplexity:.2f}, {res.bits_per_byte:.4f} bits/byte")
    if args.baseline:
        u = unigram_baseline(TokenSplit(data_dir, "train"), split).as_dict()
        out["unigram"] = u
        print(f"unigram baseline: perplexity {u['perplexity']:.2f}, {u['bits_per_byte']:.4f} bits/byte")
    return out


def _eval_images(args: argparse.Namespace, loaded) -> dict:
    """Accuracy and a confusion-matrix plot (a classifier), or caption exact match (a captioner)."""
    from lmlab.data.images import ImageSplit
    from lmlab.eval.harness.fewshot import wilson
    from lmlab.eval.images import caption_images, caption_scores, evaluate_classifier, plot_confusion

    data_dir = args.data or (loaded.run_config or {}).get("data", {}).get("dir")
    if not data_dir:
        raise LmlabError(f"{loaded.path}: no data directory recorded; give --data DIR (made by lmlab prepare)")
    name = str(loaded.checkpoint or loaded.path)
    if loaded.objective == "classify_text":
        from lmlab.data.classify import TextClassSplit

        split = TextClassSplit(data_dir, args.split, max_len=loaded.model.config.block_size)
        res = evaluate_classifier(loaded.model, split, batch_size=args.batch_size)
        lo, hi = wilson(res.accuracy, res.n)
        print(f"{name} on {data_dir} [{args.split}]: {res.n} texts, accuracy {res.accuracy:.2%} "
              f"(95% Wilson interval {lo:.1%} - {hi:.1%})")
        out = {"checkpoint": name, "data": str(data_dir), **res.as_dict(), "accuracy_interval_95": [lo, hi]}
        if args.plot:
            plot_confusion(res, args.plot)
        return out
    split = ImageSplit(data_dir, args.split)
    if loaded.objective == "caption":
        from lmlab.data.shapes import parse_caption

        rows = [json.loads(x) for x in (split.dir / split.meta["splits"][args.split]["captions"])
                .read_text(encoding="utf-8").splitlines()]
        px = split.preprocess.normalize(split.images[:])
        pred = caption_images(loaded.model, loaded.tokenizer, px, max_new_tokens=split.meta["max_tokens"] + 1)
        res = caption_scores(pred, [{k: v for k, v in r.items() if k != "caption"} for r in rows], parse_caption)
        print(f"{name} on {data_dir} [{args.split}]: {res['n']} images, caption exact match "
              f"{res['exact_match']:.2%}; per slot " + ", ".join(f"{k} {v:.2%}" for k, v in res["per_slot"].items()))
        return {"checkpoint": name, "data": str(data_dir), **res}
    if split.images.shape[-1] != loaded.model.config.n_channels:
        raise LmlabError(f"{data_dir} has {split.images.shape[-1]}-channel images; the model reads "
                         f"{loaded.model.config.n_channels}")
    res = evaluate_classifier(loaded.model, split, batch_size=max(args.batch_size, 64))
    print(f"{name} on {data_dir} [{args.split}]: {res.n} images, accuracy {res.accuracy:.2%}")
    out = {"checkpoint": name, "data": str(data_dir), **res.as_dict()}
    if args.plot:
        plot_confusion(res, args.plot)
        print(f"confusion matrix: {args.plot}")
    return out


def _eval_text_file(args: argparse.Namespace, loaded) -> dict:
    """Sliding-window perplexity of a text file (each window of --block_size tokens scores its last --stride)."""
    from lmlab.eval.perplexity import score_text

    if args.baseline or args.bf16:
        raise LmlabError(f"--{'baseline' if args.baseline else 'bf16'} needs a prepared data directory, "
                         "not a text file")
    path = Path(args.data)
    text = path.read_text(encoding="utf-8")
    block = min(args.block_size or 1024, loaded.model.config.block_size)
    stride = args.stride or block // 2
    res = score_text(loaded.model, loaded.tokenizer, text, bos=loaded.bos, block_size=block, stride=stride,
                     batch_size=args.batch_size, max_tokens=args.max_tokens, name=path.name)
    print(f"{loaded.path} on {path}: {res.tokens:,} tokens, loss {res.loss:.4f}, perplexity {res.perplexity:.2f}, "
          f"{res.bits_per_byte:.4f} bits/byte (window {block}, stride {stride})")
    return {"model": str(loaded.path), "data": str(path), **res.as_dict()}


def add_parser(add) -> None:
    sp = add("eval", run, "Loss, perplexity and bits per byte of a model on held-out text (image models: accuracy).",
             "A run or checkpoint directory is scored on a split of its prepared data (or of --data DIR);\n"
             "any model (also a .gguf file or a Hugging Face directory) scores a UTF-8 text file\n"
             "given by --data FILE.txt in sliding windows. An image classifier (ViT) reports accuracy and,\n"
             "with --plot FILE.png, its confusion matrix; a captioner caption exact match. Every token is\n"
             "scored once. Bits per byte divide the total loss by the text's UTF-8 bytes, so models with\n"
             "different tokenizers compare.\n\n"
             "examples:\n  lmlab eval runs/<run>                       test split of the run's own data\n"
             "  lmlab eval runs/<vit-run> --plot confusion.png  accuracy and confusion matrix of an image classifier\n"
             "  lmlab eval runs/<run> --split val --stride 64 --baseline --json eval.json\n"
             "  lmlab eval SmolLM2-135M.Q8_0.gguf --data wiki.test.txt --block_size 512")
    model_argument(sp, "run directory (latest checkpoint), checkpoint directory, .gguf file or HF directory")
    sp.add_argument("--data", help="a data directory (default: the one the run was trained on) or a text file")
    sp.add_argument("--split", default="test", help="data directory: train | val | test (default: test)")
    sp.add_argument("--block_size", type=int, default=0, help="text file: window length (default 1024)")
    sp.add_argument("--stride", type=int, default=None,
                    help="sliding-window stride (default: block_size; for a text file block_size / 2)")
    sp.add_argument("--batch_size", type=int, default=8)
    sp.add_argument("--max_tokens", type=int, default=0, help="score only the first N tokens (0: all)")
    sp.add_argument("--bf16", action="store_true", help="data directory: run the model under bfloat16 autocast")
    add_precision(sp)
    sp.add_argument("--baseline", action="store_true", help="data directory: also report a unigram model's figures")
    sp.add_argument("--json", help="write the results to this JSON file")
    sp.add_argument("--plot", help="image classifier: write its confusion matrix to this PNG file")
