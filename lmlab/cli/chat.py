"""`lmlab chat MODEL`: a chat on the terminal (lmlab/serve/chat.py; `eliza` is the 1966 keyword script)."""

from __future__ import annotations

import argparse
import sys

from lmlab.cli._args import add_precision, add_sampling, model_argument, take_model


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from lmlab.generate.engine import SamplingConfig

    name = take_model(args, "chat")
    if name == "eliza":  # the 1966 rung: a keyword script, no weights (lmlab/models/eliza/session.py)
        from lmlab.models.eliza.session import ElizaSession

        session, cfg = ElizaSession(seed=args.seed), None
        print(session.greeting)
    else:
        from lmlab.io.load import load_model
        from lmlab.serve.chat import ChatSession

        loaded = load_model(name, precision=args.precision)
        session = ChatSession(loaded.model, loaded.tokenizer, system=args.system, bos=loaded.bos)
        cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed)
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


def add_parser(add) -> None:
    sp = add("chat", run, "Chat with a model whose tokenizer has a chat template (e.g. a GGUF file).",
             "Type a message per line; an empty line or end of input ends the chat.\n\n"
             "examples:\n  lmlab chat SmolLM2-135M-Instruct.Q4_1.gguf --temperature 0\n"
             "  lmlab chat eliza                  the 1966 keyword script")
    model_argument(sp, ".gguf file, run/checkpoint directory, Hugging Face directory, or eliza")
    sp.add_argument("--system", default=None, help="system message (default: the template's own)")
    add_precision(sp)
    add_sampling(sp, max_new_tokens=256, temperature=0.7)
