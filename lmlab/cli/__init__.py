"""The `lmlab` command. Each subcommand is a small function; configs come from dataclasses.

Options of the form `--section.key=value` (or `--section.key value`) override any config field;
an unknown key is an error that lists the valid ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from lmlab.errors import LmlabError

EXAMPLES = """\
getting started:
  lmlab quickstart                              prepare the built-in corpus, train a small GPT, sample
  lmlab prepare stdlib-docs --out data/docs     text -> tokenizer + token shards
  lmlab train --data data/docs --model mini --train.max_steps=500 --train.lr=1e-3
  lmlab eval runs/<run> --split test            loss, perplexity and bits per byte
  lmlab generate runs/<run> "The json module" --temperature 0.8 --top_k 50
  lmlab info runs/<run>                         what a run, checkpoint or data directory holds
  lmlab ngram build text.txt --order 5 --out m.arpa   a Kneser-Ney n-gram model (as KenLM's lmplz)
  lmlab lineage                                 unigram -> KN 3/5-gram -> NPLM -> GPT perplexity ladder

Every subcommand has its own --help.
"""


def _overrides(rest: list[str], allowed_prefixes: tuple[str, ...] | None = None) -> list[str]:
    """Turn leftover ['--a.b=1', '--c.d', '2'] into ['a.b=1', 'c.d=2']; anything else is an error."""
    out, i = [], 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--"):
            raise LmlabError(f"unexpected argument '{arg}'")
        key = arg[2:]
        if "=" in key:
            out.append(key)
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            out.append(f"{key}={rest[i + 1]}")
            i += 1
        else:
            out.append(f"{key}=true")
        if allowed_prefixes is not None and "." not in out[-1].split("=")[0]:
            raise LmlabError(f"unknown option '{arg}'. Config overrides look like "
                             f"--{allowed_prefixes[0]}.key=value (sections: {', '.join(allowed_prefixes)})")
        i += 1
    return out


# ---------------------------------------------------------------------------------------------
# prepare


def cmd_prepare(args: argparse.Namespace, rest: list[str]) -> int:
    from lmlab.config import apply_overrides
    from lmlab.data.prepare import PrepareConfig, prepare

    if rest:
        raise LmlabError(f"unexpected arguments: {' '.join(rest)} (see lmlab prepare --help)")
    given = [f"{f.name}={getattr(args, f.name)}" for f in dataclasses.fields(PrepareConfig)
             if f.name != "source" and getattr(args, f.name) is not None]
    cfg = apply_overrides(PrepareConfig(source=args.source), given)
    prepare(cfg, force=args.force)
    return 0


# ---------------------------------------------------------------------------------------------
# train


def build_run_config(args: argparse.Namespace, rest: list[str]):
    from lmlab.config import apply_overrides, from_dict, load_yaml
    from lmlab.models.registry import preset
    from lmlab.train.checkpoint import read_run_config
    from lmlab.train.config import RunConfig

    if args.resume:
        cfg = read_run_config(Path(args.resume))
    elif args.config:
        cfg = from_dict(RunConfig, load_yaml(args.config))
    else:
        cfg = RunConfig()
    if args.model:
        vocab = cfg.model.vocab_size
        cfg.model = preset(args.model)
        cfg.model.vocab_size = vocab
    if args.data:
        cfg.data.dir = args.data
    if args.out:
        cfg.train.out_dir = args.out
    if args.resume:
        cfg.train.out_dir = args.resume
    return apply_overrides(cfg, _overrides(rest, ("model", "data", "train")))


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from lmlab.config import dump_yaml
    from lmlab.train.trainer import Trainer

    cfg = build_run_config(args, rest)
    run_dir = Path(cfg.train.out_dir or f"runs/{cfg.model.family}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg.train.out_dir = str(run_dir)
    if not args.resume and run_dir.exists() and any(run_dir.iterdir()):
        raise LmlabError(f"run directory {run_dir} already exists; continue it with "
                         f"`lmlab train --resume {run_dir}` or choose another --out")
    trainer = Trainer(cfg, run_dir)
    print(dump_yaml(cfg), end="")
    if args.resume and trainer.resume() is None:
        print(f"no checkpoint in {run_dir} yet; starting from step 0")
    n = trainer.model.num_params()
    print(f"model: {cfg.model.family}, {n / 1e6:.2f}M parameters without embeddings, "
          f"{trainer.model.num_params(non_embedding=False) / 1e6:.2f}M with; run directory {run_dir}")
    summary = trainer.fit()
    line = f"step {summary['step']}: train loss {summary['loss']:.4f}"
    if "val_loss" in summary:
        line += f", val loss {summary['val_loss']:.4f} (ppl {math.exp(summary['val_loss']):.2f})"
    print(line)
    return 0


# ---------------------------------------------------------------------------------------------
# eval / generate / info


def cmd_eval(args: argparse.Namespace, rest: list[str]) -> int:
    import torch

    from lmlab.data.stream import TokenSplit
    from lmlab.eval.perplexity import evaluate_split, unigram_baseline
    from lmlab.train.checkpoint import load_checkpoint

    _overrides(rest, ("eval",)) if rest else None
    if args.model:
        return _eval_text_file(args)
    if not args.checkpoint:
        raise LmlabError("give a run/checkpoint directory, or --model FILE.gguf --data FILE.txt")
    model, cfg, _, ckpt = load_checkpoint(args.checkpoint)
    data_dir = args.data or cfg.data.dir
    split = TokenSplit(data_dir, args.split)
    if split.meta["vocab_size"] > cfg.model.vocab_size:
        raise LmlabError(f"{data_dir} was tokenized with a larger vocabulary than the model's")
    res = evaluate_split(model, split, block_size=cfg.model.block_size, stride=args.stride,
                         batch_size=args.batch_size, max_tokens=args.max_tokens,
                         autocast_dtype=torch.bfloat16 if args.bf16 else None)
    out = {"checkpoint": str(ckpt), "data": str(data_dir), **res.as_dict()}
    if args.baseline:
        out["unigram"] = unigram_baseline(TokenSplit(data_dir, "train"), split).as_dict()
    print(f"{ckpt} on {data_dir} [{args.split}]: {res.tokens:,} tokens, loss {res.loss:.4f}, "
          f"perplexity {res.perplexity:.2f}, {res.bits_per_byte:.4f} bits/byte")
    if args.baseline:
        u = out["unigram"]
        print(f"unigram baseline: perplexity {u['perplexity']:.2f}, {u['bits_per_byte']:.4f} bits/byte")
    if args.json:
        from lmlab.utils.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(out, indent=2))
    return 0


def _load_lm(path: str, precision: str | None = None):
    """(model, tokenizer) from a GGUF file (lmlab/io/gguf/read.py) or a run/checkpoint directory, converted
    to `precision` (lmlab/nn/quant.py; default: the fast one for GGUF files, as stored otherwise)."""
    from lmlab.nn.quant import DEFAULT_PRECISION, quantize_

    if str(path).endswith(".gguf"):
        from lmlab.io.gguf.read import load_gguf

        model, tok = load_gguf(path)
        precision = precision or DEFAULT_PRECISION
    else:
        from lmlab.train.checkpoint import load_checkpoint

        model, _, tok, _ = load_checkpoint(path)
    return (quantize_(model, precision) if precision else model), tok


def _sampling(args: argparse.Namespace):
    from lmlab.generate.engine import SamplingConfig

    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed)


def cmd_chat(args: argparse.Namespace, rest: list[str]) -> int:
    from lmlab.serve.chat import ChatSession

    if rest:
        raise LmlabError(f"unexpected arguments: {' '.join(rest)}")
    if args.model == "eliza":  # the 1966 rung: a keyword script, no weights (lmlab/models/eliza/session.py)
        from lmlab.models.eliza.session import ElizaSession

        session, cfg = ElizaSession(seed=args.seed), None
        print(session.greeting)
    else:
        model, tok = _load_lm(args.model, args.precision)
        session, cfg = ChatSession(model, tok, system=args.system), _sampling(args)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        for piece in session.reply(user, cfg):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def _eval_text_file(args: argparse.Namespace) -> int:
    """`lmlab eval --model FILE.gguf --data FILE.txt`: sliding-window perplexity of a text file under a
    model that brings its own tokenizer (each window of `--block_size` tokens scores its last `--stride`)."""
    import numpy as np

    from lmlab.eval.perplexity import EvalResult, token_nll

    path = Path(args.data or "")
    if not path.is_file():
        raise LmlabError("--model needs --data FILE.txt, a UTF-8 text file to score")
    model, tok = _load_lm(args.model, "fp32")  # scoring: the reference precision
    text = path.read_text(encoding="utf-8")
    ids = np.array(tok.encode(text), dtype=np.int64)
    n_bytes = len(text.encode("utf-8"))
    if args.max_tokens and len(ids) > args.max_tokens:
        n_bytes = round(n_bytes * args.max_tokens / len(ids))  # approximate: proportional share
        ids = ids[:args.max_tokens]
    block = min(args.block_size or 1024, model.config.block_size)
    stride = args.stride or block // 2
    nll = token_nll(model, ids, bos=tok.bos_id, block_size=block, stride=stride, batch_size=args.batch_size)
    res = EvalResult(path.name, len(ids), n_bytes, float(nll.mean()) if len(nll) else float("nan"))
    print(f"{args.model} on {path}: {res.tokens:,} tokens, loss {res.loss:.4f}, perplexity {res.perplexity:.2f}, "
          f"{res.bits_per_byte:.4f} bits/byte (window {block}, stride {stride})")
    if args.json:
        from lmlab.utils.atomic import atomic_write_text

        out = {"model": str(args.model), "data": str(path), **res.as_dict()}
        atomic_write_text(args.json, json.dumps(out, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace, rest: list[str]) -> int:
    from lmlab.generate.engine import SamplingConfig, stream_text

    if rest:
        raise LmlabError(f"unexpected arguments: {' '.join(rest)}")
    if args.model_path:  # `lmlab generate --model RUN "text"`: the first positional is the text
        if args.prompt:
            raise LmlabError(f"unexpected argument '{args.prompt}' (the model is given by --model)")
        args.checkpoint, args.prompt = args.model_path, args.checkpoint or ""
    if not args.checkpoint:
        raise LmlabError("give the model: lmlab generate RUN_DIR \"text\" (or --model RUN_DIR)")
    model, tok = _load_lm(args.checkpoint, args.precision)
    if hasattr(model, "cross_kv"):  # an encoder-decoder: the text is its source
        return _generate_seq2seq(args, model, tok)
    if args.mode == "nar":
        raise LmlabError("--mode nar needs a conditional masked LM (e.g. trained with --model cmlm-tiny)")
    if args.temperature is None:
        args.temperature = 0.8
    if getattr(model, "objective", "causal") != "causal":
        raise LmlabError(f"generate continues text with a causal LM; '{model.config.family}' is not one"
                         + (" (try lmlab fill-mask)" if model.objective == "mlm" else ""))
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed,
                         stop=[x.replace("\\n", "\n").replace("\\t", "\t") for x in args.stop or []])
    pieces = stream_text(model, tok, args.prompt, cfg, use_cache=not args.no_cache)
    first = next(pieces, "")  # a bad prompt (e.g. longer than the context) fails before any output
    sys.stdout.write(args.prompt + first)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _generate_seq2seq(args: argparse.Namespace, model, tok) -> int:
    """Encoder-decoders: BART left to right (greedy, beam search, sampling), a CMLM by mask-predict."""
    from lmlab.generate.nar import MaskPredictConfig, nar_generate_text
    from lmlab.generate.seq2seq import Seq2SeqConfig, generate_text

    if not args.prompt.strip():
        raise LmlabError("give the source text: lmlab generate RUN_DIR \"text\"")
    is_cmlm = hasattr(model, "length_logits")
    mode = args.mode or ("nar" if is_cmlm else "ar")
    if mode == "nar" and not is_cmlm:
        raise LmlabError(f"--mode nar needs a conditional masked LM (cmlm), not '{model.config.family}'")
    if mode == "ar" and is_cmlm:
        raise LmlabError("a conditional masked LM decodes non-autoregressively: use --mode nar")
    if mode == "nar":
        cfg = MaskPredictConfig(iterations=args.iterations, length_beam=args.length_beam)
        if cfg.iterations < 1 or cfg.length_beam < 1:
            raise LmlabError("--iterations and --length_beam must be at least 1")
        print(nar_generate_text(model, tok, [args.prompt], cfg)[0])
        return 0
    if args.num_beams < 1:
        raise LmlabError("--num_beams must be at least 1")
    temperature = args.temperature if args.temperature is not None else 0.0  # greedy unless asked
    if args.num_beams > 1 and temperature > 0:
        raise LmlabError("beam search is deterministic: drop --temperature or use --num_beams 1")
    cfg = Seq2SeqConfig(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                        length_penalty=args.length_penalty, early_stopping=args.early_stopping,
                        temperature=temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(generate_text(model, tok, [args.prompt], cfg)[0])
    return 0


def _add_precision(sp: argparse.ArgumentParser) -> None:
    from lmlab.nn.quant import DEFAULT_PRECISION, PRECISIONS

    sp.add_argument("--precision", choices=PRECISIONS, default=None,
                    help=f"weights for inference (default: {DEFAULT_PRECISION} for a .gguf file, as stored otherwise)")


def cmd_fill_mask(args: argparse.Namespace, rest: list[str]) -> int:
    from lmlab.generate.fill_mask import fill_mask
    from lmlab.train.checkpoint import load_checkpoint

    if rest:
        raise LmlabError(f"unexpected arguments: {' '.join(rest)}")
    model, _, tok, _ = load_checkpoint(args.checkpoint)
    for i, fillers in enumerate(fill_mask(model, tok, args.text, args.top_k)):
        print(f"mask {i + 1}: " + "  ".join(f"{t!r} {p:.3f}" for t, p in fillers))
    return 0


def cmd_info(args: argparse.Namespace, rest: list[str]) -> int:
    from lmlab.io.describe import describe_path

    if rest:
        raise LmlabError(f"unexpected arguments: {' '.join(rest)}")
    print(describe_path(Path(args.path)))
    return 0


def cmd_scaling(args: argparse.Namespace, rest: list[str]) -> int:
    from lmlab.config import apply_overrides
    from lmlab.scaling import report
    from lmlab.scaling.sweep import SweepConfig, sweep

    if args.action == "sweep":
        cfg = apply_overrides(SweepConfig(), _overrides(rest))
        sweep(cfg)
        print(f"results in {cfg.out}/results.md; fit them with `lmlab scaling fit {cfg.out}`")
        return 0
    if args.action == "longer":
        return _train_longer(args, rest)
    if rest:
        raise LmlabError(f"unexpected arguments: {' '.join(rest)}")
    if args.action == "fit":
        if not args.path:
            raise LmlabError("give the sweep directory: lmlab scaling fit runs/scaling")
        fit = report.fit_results(report.load_results(args.path), n_bootstrap=args.bootstrap)
        out = Path(args.path) / "fit.json" if Path(args.path).is_dir() else Path(args.path).with_name("fit.json")
        report.write_fit(fit, out)
        print(report.summary(fit))
        from lmlab.scaling.fit import ChinchillaLaw, KaplanLaw
        from lmlab.scaling.plots import write_sweep_plots

        plots = write_sweep_plots(report.load_results(args.path), ChinchillaLaw(**fit["chinchilla"]), out.parent,
                                  kaplan=KaplanLaw(**fit["kaplan"]))
        print(f"wrote {out}" + "".join(f", {p}" for p in plots))
        return 0
    if not args.path or args.n is None or args.d is None:
        raise LmlabError("usage: lmlab scaling predict FIT.json --n PARAMS --d TOKENS")
    path = Path(args.path)
    if not path.is_file():
        raise LmlabError(f"fit file not found: {path}")
    p = report.predict(json.loads(path.read_text()), args.n, args.d, law=args.law)
    print(f"predicted final validation loss for N={args.n:.3g}, D={args.d:.3g} (C={p['C']:.3g}): "
          f"{p['loss']:.4f}, 90% interval [{p['interval_90'][0]:.4f}, {p['interval_90'][1]:.4f}] ({args.law} law)")
    return 0


def _train_longer(args: argparse.Namespace, rest: list[str]) -> int:
    """`lmlab scaling longer FIT.json --n N`: one run per multiple of the compute-optimal budget."""
    from lmlab.config import apply_overrides
    from lmlab.scaling.fit import ChinchillaLaw
    from lmlab.scaling.plots import train_longer as plot_longer
    from lmlab.scaling.sweep import SweepConfig, train_longer

    if not args.path or args.n is None:
        raise LmlabError("usage: lmlab scaling longer FIT.json --n PARAMS [--multiples 1,2,4,8,16]")
    path = Path(args.path)
    if not path.is_file():
        raise LmlabError(f"fit file not found: {path}")
    law = ChinchillaLaw(**json.loads(path.read_text())["chinchilla"])
    try:
        multiples = [float(m) for m in args.multiples.split(",")]
    except ValueError:
        raise LmlabError(f"--multiples must be numbers separated by commas, not '{args.multiples}'") from None
    d_opt = float(law.optimal_tokens(args.n))
    cfg = apply_overrides(SweepConfig(out="runs/scaling-longer"), _overrides(rest))
    print(f"N={args.n:.3g}: compute-optimal D = {d_opt:.3g} tokens by the fit; budgets x{args.multiples}")
    rows = train_longer(cfg, args.n, [m * d_opt for m in multiples])
    for r, m in zip(rows, multiples):
        r["multiple"] = m
        r["predicted_loss"] = float(law.loss(r["N"], r["D"]))
    from lmlab.utils.atomic import atomic_write_text

    out = Path(cfg.out)
    atomic_write_text(out / "longer.json", json.dumps(rows, indent=2))
    lines = ["| x D* | D | val loss | law's prediction | error |", "|---|---|---|---|---|"]
    lines += [f"| {r['multiple']:g} | {r['D']:,} | {r['val_loss']:.4f} | {r['predicted_loss']:.4f} | "
              f"{(r['predicted_loss'] - r['val_loss']) / r['val_loss']:+.2%} |" for r in rows]
    atomic_write_text(out / "longer.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        print(f"wrote {out}/longer.md, {plot_longer(rows, law, out / 'train_longer.png')}")
    except ImportError:
        print(f"wrote {out}/longer.md (matplotlib missing: no plot)")
    return 0


def cmd_quickstart(args: argparse.Namespace, rest: list[str]) -> int:
    from lmlab.recipes.quickstart import quickstart

    return quickstart(out=args.out, data=args.data, steps=args.steps, overrides=_overrides(rest, ("model", "train")))


# ---------------------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    from lmlab import __version__

    p = argparse.ArgumentParser(
        prog="lmlab", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Language models from n-grams to LLMs: prepare data, train, evaluate, generate.",
        epilog=EXAMPLES)
    p.add_argument("--version", action="version", version=f"lmlab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, func, help: str, epilog: str = "") -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, epilog=epilog, allow_abbrev=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(func=func)
        return sp

    from lmlab.config import describe
    from lmlab.data.prepare import PrepareConfig
    from lmlab.models.registry import PRESETS
    from lmlab.train.config import RunConfig

    sp = add("prepare", cmd_prepare, "Turn text into a tokenizer and token shards (a data directory).",
             "sources: a file, a folder, a glob ('texts/**/*.txt'), a .jsonl file, or a built-in corpus:\n"
             "  stdlib-docs  English docstrings and help topics of this Python's standard library\n"
             "  stdlib-code  the standard library's source code (~30 MB)\n\n"
             "options (defaults shown):\n" + "\n".join(describe(PrepareConfig)) +
             "\n\nexample: lmlab prepare notes/ --out data/notes --tokenizer=char")
    sp.add_argument("source", nargs="?", default="stdlib-docs", help="text to prepare (default: stdlib-docs)")
    sp.add_argument("--force", action="store_true", help="rebuild the data directory if it exists")
    for f in dataclasses.fields(PrepareConfig):
        if f.name != "source":
            sp.add_argument(f"--{f.name}", default=None, help=argparse.SUPPRESS)

    sp = add("train", cmd_train, "Train a model on a prepared data directory.",
             "any config key can be overridden (defaults shown):\n" + "\n".join(describe(RunConfig)) +
             "\n\nexamples:\n  lmlab train --data data/stdlib-docs --model mini --train.max_steps=300\n"
             "  lmlab train --config configs/small-stdlib-docs.yaml --train.dtype=float32\n"
             "  lmlab train --resume runs/gpt-20260101-120000     (continue exactly where it stopped)")
    sp.add_argument("--config", help="YAML file with model/data/train sections")
    sp.add_argument("--model", help="model preset: " + ", ".join(PRESETS))
    sp.add_argument("--data", help="prepared data directory (same as --data.dir)")
    sp.add_argument("--out", help="run directory to create (same as --train.out_dir)")
    sp.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")

    sp = add("eval", cmd_eval, "Loss, perplexity and bits per byte of a checkpoint on a held-out split.",
             "Every token of the split is scored once. Bits per byte divide the total loss by the text's\n"
             "UTF-8 bytes, so models with different tokenizers compare fairly.\n\n"
             "examples:\n  lmlab eval runs/<run>                       test split of the run's own data\n"
             "  lmlab eval runs/<run> --split val --stride 64 --baseline --json eval.json")
    sp.add_argument("checkpoint", nargs="?", help="run directory (latest checkpoint) or checkpoint directory")
    sp.add_argument("--model", help="a .gguf file instead of a checkpoint; --data is then a text file")
    sp.add_argument("--block_size", type=int, default=0, help="with --model: window length (default 1024)")
    sp.add_argument("--data", help="data directory (default: the one the model was trained on)")
    sp.add_argument("--split", default="test", help="train | val | test (default: test)")
    sp.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: block_size)")
    sp.add_argument("--batch_size", type=int, default=8)
    sp.add_argument("--max_tokens", type=int, default=0, help="score only the first N tokens (0: all)")
    sp.add_argument("--bf16", action="store_true", help="run the model under bfloat16 autocast")
    sp.add_argument("--baseline", action="store_true", help="also report a unigram model's figures")
    sp.add_argument("--json", help="write the results to this JSON file")

    sp = add("generate", cmd_generate, "Continue a prompt with a trained model, streaming the text.",
             "examples:\n  lmlab generate runs/<run> \"The json module\" --temperature 0   (greedy)\n"
             "  lmlab generate runs/<run> \"def \" --top_p 0.9 --seed 1 --stop \"\\n\\n\"\n"
             "  lmlab generate --model runs/<bart-run> \"alfa bravo\" --num_beams 4       (encoder-decoder)\n"
             "  lmlab generate --model runs/<cmlm-run> --mode nar --iterations 4 \"alfa bravo\"  (mask-predict)")
    sp.add_argument("checkpoint", nargs="?",
                    help="run directory (latest checkpoint), checkpoint directory or .gguf file")
    sp.add_argument("prompt", nargs="?", default="",
                    help="text to continue (default: start a new document); an encoder-decoder's source text")
    sp.add_argument("--model", dest="model_path", help="the model (instead of the first argument)")
    sp.add_argument("--max_new_tokens", type=int, default=200)
    sp.add_argument("--temperature", type=float, default=None,
                    help="0 for greedy decoding (default: 0.8; 0 for encoder-decoders)")
    sp.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    sp.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    sp.add_argument("--seed", type=int, default=None)
    sp.add_argument("--stop", action="append", help="stop when this string appears (repeatable)")
    sp.add_argument("--no_cache", action="store_true", help="recompute the context each step (slow)")
    _add_precision(sp)
    sp.add_argument("--mode", choices=["ar", "nar"], default=None,
                    help="encoder-decoders: ar = left to right (BART), nar = mask-predict (a CMLM's default)")
    sp.add_argument("--num_beams", type=int, default=1, help="ar: beam search with this many beams")
    sp.add_argument("--length_penalty", type=float, default=1.0, help="ar beam search: score / length ** this")
    sp.add_argument("--early_stopping", action="store_true", help="ar beam search: stop once num_beams finished")
    sp.add_argument("--iterations", type=int, default=10, help="nar: mask-predict iterations T")
    sp.add_argument("--length_beam", type=int, default=1, help="nar: candidate target lengths decoded")

    sp = add("fill-mask", cmd_fill_mask, "Print the most likely fillers of each <mask> (masked LMs such as BERT).",
             "example:\n  lmlab fill-mask runs/<bert-run> \"The json <mask>odule\" --top_k 5")
    sp.add_argument("checkpoint", help="run or checkpoint directory of a masked language model")
    sp.add_argument("text", help="text with one or more <mask> (the tokenizer's mask token)")
    sp.add_argument("--top_k", type=int, default=5, help="fillers shown per mask")

    sp = add("chat", cmd_chat, "Chat with a model whose tokenizer has a chat template (e.g. a GGUF file).",
             "Type a message per line; an empty line or end of input ends the chat.\n\n"
             "example:\n  lmlab chat --model SmolLM2-135M-Instruct.Q4_1.gguf --temperature 0")
    sp.add_argument("--model", required=True, help=".gguf file, run/checkpoint directory, or eliza")
    sp.add_argument("--system", default=None, help="system message (default: the template's own)")
    _add_precision(sp)
    sp.add_argument("--max_new_tokens", type=int, default=256)
    sp.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
    sp.add_argument("--top_k", type=int, default=0)
    sp.add_argument("--top_p", type=float, default=1.0)
    sp.add_argument("--seed", type=int, default=None)

    sp = add("info", cmd_info, "Show what a data, run or checkpoint directory holds.",
             "for a data directory: corpus, Python version and content hash, tokenizer, tokens per split;\n"
             "for a run or checkpoint: parameters, step, tokens seen, validation loss and the full config.\n\n"
             "examples:\n  lmlab info data/stdlib-docs\n  lmlab info runs/quickstart-20260101-120000")
    sp.add_argument("path", help="a data directory, run directory or checkpoint directory")

    from lmlab.scaling.sweep import SweepConfig

    sp = add("scaling", cmd_scaling, "Scaling laws: sweep model sizes x token budgets, fit the laws, predict a run.",
             "actions:\n  sweep    train the grid (resumable: finished runs are skipped, interrupted ones resumed)\n"
             "  fit      fit L(N, D) (Chinchilla Approach 3), L(N), L(D), L(C), IsoFLOP optima; bootstrap\n"
             "  predict  predicted loss with a 90% interval for a run not yet trained\n"
             "  longer   train longer: fixed --n, one run per multiple of its compute-optimal D\n\n"
             "sweep options (defaults shown):\n" + "\n".join(describe(SweepConfig)) +
             "\n\nexamples:\n  lmlab prepare stdlib-code --out data/stdlib-code --vocab_size 1024\n"
             "  lmlab scaling sweep --workers=2          # the default grid, two 1-thread processes\n"
             "  lmlab scaling sweep --sizes=1e5,3e5,1e6 --tokens=2e6,4e6,8e6,16e6 --max_compute=0\n"
             "  lmlab scaling fit runs/scaling\n"
             "  lmlab scaling predict runs/scaling/fit.json --n 2e6 --d 3.2e7 --law kaplan")
    sp.add_argument("action", choices=["sweep", "fit", "predict", "longer"])
    sp.add_argument("path", nargs="?", help="fit: the sweep directory; predict: its fit.json")
    sp.add_argument("--n", type=float, help="predict: non-embedding parameters")
    sp.add_argument("--d", type=float, help="predict: training tokens")
    sp.add_argument("--bootstrap", type=int, default=100, help="fit: bootstrap resamples for intervals")
    sp.add_argument("--law", default="chinchilla", choices=("chinchilla", "kaplan"),
                    help="predict: which fitted law (kaplan: Kaplan et al. 2020 eq. 1.5)")
    sp.add_argument("--multiples", default="1,2,4,8,16",
                    help="longer: token budgets as multiples of the fit's compute-optimal D for --n")

    sp = add("quickstart", cmd_quickstart,
             "The main job: prepare the built-in corpus, train a small GPT (a few minutes on a CPU), "
             "compare it with a unigram baseline and print a sample.")
    sp.add_argument("--out", default="", help="run directory (default: runs/quickstart-<time>)")
    sp.add_argument("--data", default="data/stdlib-docs", help="data directory to use or create")
    sp.add_argument("--steps", type=int, default=0, help="training steps (default: the recipe's)")

    from lmlab.cli.lineage import add_parser as add_lineage
    from lmlab.cli.ngram import add_parser as add_ngram

    add_ngram(add)
    add_lineage(add)
    from lmlab.cli.word2vec import add_parser as add_word2vec

    add_word2vec(add)
    from lmlab.cli.fewshot import add_parser as add_fewshot

    add_fewshot(add)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args, rest = parser.parse_known_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return args.func(args, rest)
    except LmlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
