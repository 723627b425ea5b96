"""`lmlab prepare SOURCE`: text -> tokenizer + token shards (lmlab/data/prepare.py), or images ->
pixel shards + a preprocessing config (lmlab/data/images.py)."""

from __future__ import annotations

import argparse
import dataclasses

from lmlab.config import apply_overrides, describe
from lmlab.data.images import IMAGE_SOURCES, ImagePrepareConfig, is_image_folder, prepare_images
from lmlab.data.prepare import PrepareConfig, prepare
from lmlab.errors import LmlabError

_FIELDS = {f.name for cls in (PrepareConfig, ImagePrepareConfig) for f in dataclasses.fields(cls)} - {"source"}


def run(args: argparse.Namespace, rest: list[str]) -> int:
    images = args.source in IMAGE_SOURCES or is_image_folder(args.source)
    cls = ImagePrepareConfig if images else PrepareConfig
    names = {f.name for f in dataclasses.fields(cls)}
    given = [f"{k}={getattr(args, k)}" for k in sorted(_FIELDS) if getattr(args, k) is not None]
    other = [g.split("=")[0] for g in given if g.split("=")[0] not in names]
    if other:
        raise LmlabError(f"--{other[0]} does not apply to {'images' if images else 'text'} ({args.source})")
    cfg = apply_overrides(cls(source=args.source), given)
    (prepare_images if images else prepare)(cfg, force=args.force)
    return 0


def add_parser(add) -> None:
    sp = add("prepare", run, "Turn text into a tokenizer and token shards, or images into pixel shards.",
             "text sources: a file, a folder, a glob ('texts/**/*.txt'), a .jsonl file, or a built-in corpus:\n"
             "  stdlib-docs  English docstrings and help topics of this Python's standard library\n"
             "  stdlib-code  the standard library's source code (~30 MB)\n"
             "image sources: a folder with one sub-folder of images per class, or a built-in set:\n"
             "  sklearn-digits   scikit-learn's 1,797 8x8 handwritten digits (stratified train/val/test)\n"
             "  shapes-captions  seeded pictures of two coloured shapes with captions (lmlab/data/shapes.py)\n\n"
             "text options (defaults shown):\n" + "\n".join(describe(PrepareConfig)) +
             "\n\nimage options (defaults shown):\n" + "\n".join(describe(ImagePrepareConfig)) +
             "\n\nexamples:\n  lmlab prepare notes/ --out data/notes --tokenizer=char\n"
             "  lmlab prepare ../shared/data/ptb --splits=files --tokenizer=word --min_count=1 --vocab_size=0\n"
             "      (given train/valid/test files, each one split)\n"
             "  lmlab prepare photos/ --image_size 32 --out data/photos    (photos/<class>/*.jpg)")
    sp.add_argument("source", nargs="?", default="stdlib-docs", help="text or images to prepare (default: stdlib-docs)")
    sp.add_argument("--force", action="store_true", help="rebuild the data directory if it exists")
    for name in sorted(_FIELDS):
        sp.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
