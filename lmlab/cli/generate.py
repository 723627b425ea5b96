"""`lmlab generate MODEL [PROMPT]`: continue a prompt, streaming the text (lmlab/generate/)."""

from __future__ import annotations

import argparse
import sys

from lmlab.cli._args import add_precision, add_sampling, deprecated
from lmlab.errors import LmlabError


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from lmlab.generate.engine import SamplingConfig, stream_text
    from lmlab.io.load import load_model

    if args.old_model:  # `lmlab generate --model RUN "text"`: the first positional is the text
        if args.prompt:
            raise LmlabError(f"unexpected argument '{args.prompt}' (the model is given by --model)")
        deprecated(f"lmlab generate --model {args.old_model} TEXT", f"lmlab generate {args.old_model} TEXT")
        args.model, args.prompt = args.old_model, args.model or ""
    if not args.model:
        raise LmlabError("give the model: lmlab generate MODEL \"text\"")
    loaded = load_model(args.model, precision=args.precision)
    model, tok = loaded.model, loaded.tokenizer
    inputs = _image_inputs(args, loaded)
    if hasattr(model, "cross_kv"):  # an encoder-decoder: the text is its source
        return _generate_seq2seq(args, model, tok)
    if args.mode == "nar":
        raise LmlabError("--mode nar needs a conditional masked LM (e.g. trained with --model cmlm-tiny)")
    if loaded.objective not in ("causal", "caption") or tok is None:
        raise LmlabError(f"generate continues text with a causal LM; '{loaded.name}' is not one"
                         + (" (try lmlab fill-mask)" if loaded.objective == "mlm" else ""))
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens,
                         temperature=0.8 if args.temperature is None else args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                         stop=[x.replace("\\n", "\n").replace("\\t", "\t") for x in args.stop or []])
    pieces = stream_text(model, tok, args.prompt, cfg, use_cache=not args.no_cache,
                         bos=loaded.bos, inputs=inputs)
    first = next(pieces, "")  # a bad prompt (e.g. longer than the context) fails before any output
    sys.stdout.write(args.prompt + first)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _image_inputs(args: argparse.Namespace, loaded) -> dict | None:
    """`--image FILE`: the image preprocessed as the model's training data was (its checkpoint's
    preprocessor_config.json), for a model that reads images before text (a captioner)."""
    reads_images = hasattr(loaded.model, "n_prefix_tokens")
    if args.image is None:
        if reads_images:
            raise LmlabError(f"{loaded.name} captions images: give one with --image FILE")
        return None
    if not reads_images:
        raise LmlabError(f"--image needs a model that reads images before text (e.g. --model caption-shapes), "
                         f"not '{loaded.model.config.family}'")
    from lmlab.data.images import Preprocess

    pre = Preprocess.load(loaded.checkpoint or loaded.path)
    return {"pixel_values": pre(args.image)[None]}


def _generate_seq2seq(args: argparse.Namespace, model, tok) -> int:
    """Encoder-decoders: BART left to right (greedy, beam search, sampling), a CMLM by mask-predict."""
    from lmlab.generate.nar import MaskPredictConfig, nar_generate_text
    from lmlab.generate.seq2seq import Seq2SeqConfig, generate_text

    if not args.prompt.strip():
        raise LmlabError("give the source text: lmlab generate MODEL \"text\"")
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


def add_parser(add) -> None:
    sp = add("generate", run, "Continue a prompt with a model, streaming the text.",
             "examples:\n  lmlab generate runs/<run> \"The json module\" --temperature 0   (greedy)\n"
             "  lmlab generate runs/<run> \"def \" --top_p 0.9 --seed 1 --stop \"\\n\\n\"\n"
             "  lmlab generate SmolLM2-135M.Q8_0.gguf \"Once upon a time\"\n"
             "  lmlab generate runs/<bart-run> \"alfa bravo\" --num_beams 4            (encoder-decoder)\n"
             "  lmlab generate runs/<cmlm-run> \"alfa bravo\" --mode nar --iterations 4 (mask-predict)\n"
             "  lmlab generate --image picture.png runs/<captioner-run> --temperature 0      (image to text)")
    sp.add_argument("model", metavar="MODEL", nargs="?",
                    help="run directory (latest checkpoint), checkpoint directory, .gguf file or HF directory")
    sp.add_argument("prompt", nargs="?", default="",
                    help="text to continue (default: start a new document); an encoder-decoder's source text")
    sp.add_argument("--model", dest="old_model", metavar="MODEL", help=argparse.SUPPRESS)
    sp.add_argument("--image", metavar="FILE", help="an image to caption (a captioner, e.g. --model caption-shapes)")
    add_sampling(sp, max_new_tokens=200, temperature=None,
                 temperature_help="0 for greedy decoding (default: 0.8; 0 for encoder-decoders)")
    sp.add_argument("--stop", action="append", help="stop when this string appears (repeatable)")
    sp.add_argument("--no_cache", action="store_true", help="recompute the context each step (slow)")
    add_precision(sp)
    sp.add_argument("--mode", choices=["ar", "nar"], default=None,
                    help="encoder-decoders: ar = left to right (BART), nar = mask-predict (a CMLM's default)")
    sp.add_argument("--num_beams", type=int, default=1, help="ar: beam search with this many beams")
    sp.add_argument("--length_penalty", type=float, default=1.0, help="ar beam search: score / length ** this")
    sp.add_argument("--early_stopping", action="store_true", help="ar beam search: stop once num_beams finished")
    sp.add_argument("--iterations", type=int, default=10, help="nar: mask-predict iterations T")
    sp.add_argument("--length_beam", type=int, default=1, help="nar: candidate target lengths decoded")
