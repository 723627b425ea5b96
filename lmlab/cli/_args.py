"""Helpers shared by the subcommand modules: config overrides, the deprecated `--model FILE`
spelling, and the option groups several commands have (precision, sampling)."""

from __future__ import annotations

import argparse
import logging

from lmlab.errors import LmlabError

log = logging.getLogger("lmlab.cli")


def overrides(rest: list[str]) -> list[str]:
    """Turn leftover ['--a.b=1', '--c.d', '2'] into ['a.b=1', 'c.d=2'] for `lmlab.config.apply_overrides`,
    which rejects a key its dataclass does not have; a leftover that is not an option is an error."""
    out, i = [], 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or arg == "--":
            raise LmlabError(f"unexpected argument '{arg}'")
        key = arg[2:]
        if "=" in key:
            out.append(key)
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            out.append(f"{key}={rest[i + 1]}")
            i += 1
        else:
            out.append(f"{key}=true")
        i += 1
    return out


def deprecated(old: str, new: str) -> None:
    """One line on stderr: the old spelling still works for this release."""
    log.warning(f"`{old}` is deprecated and will be removed in the next release; use `{new}`")


def model_argument(sp: argparse.ArgumentParser, help: str, *, required: bool = True, nargs: str | None = "?") -> None:
    """The positional MODEL, plus the deprecated `--model MODEL` spelling (dest `old_model`)."""
    sp.add_argument("model", metavar="MODEL", nargs=nargs, help=help)
    sp.add_argument("--model", dest="old_model", metavar="MODEL", help=argparse.SUPPRESS)


def take_model(args: argparse.Namespace, command: str) -> str:
    """The model a command was given: positional MODEL, or the deprecated --model (with a warning)."""
    if args.old_model:
        deprecated(f"lmlab {command} --model {args.old_model}", f"lmlab {command} {args.old_model}")
        if args.model:
            raise LmlabError(f"give the model once: lmlab {command} MODEL (not also --model)")
        return args.old_model
    if not args.model:
        raise LmlabError(f"give the model: lmlab {command} MODEL (see lmlab {command} --help)")
    return args.model


def add_precision(sp: argparse.ArgumentParser) -> None:
    from lmlab.nn.quant import DEFAULT_PRECISION, PRECISIONS

    sp.add_argument("--precision", choices=PRECISIONS, default=None,
                    help=f"weights for inference (default: {DEFAULT_PRECISION} for a .gguf file, as stored "
                         "otherwise); a .gguf file's blocks as stored: gguf decodes with int8 activations where "
                         "the CPU has AVX-512 VNNI, gguf-exact with fp32 ones, gguf-q8 with llama.cpp's 8-bit")


def add_sampling(sp: argparse.ArgumentParser, *, max_new_tokens: int, temperature: float | None,
                 temperature_help: str = "0 for greedy decoding") -> None:
    sp.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    sp.add_argument("--temperature", type=float, default=temperature, help=temperature_help)
    sp.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    sp.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    sp.add_argument("--seed", type=int, default=None)
