"""A text-classification task built offline from the standard library: which top-level package a
docstring comes from (issue 19's encoder-vs-LLM contrast).

Items are the docstrings of the stdlib-docs corpus (lmlab/data/sources.py; tests excluded), labelled by
the top-level package of their file (`email/mime/text.py` -> `email`); the `n_classes` packages with the
most distinct docstrings are the classes (`encodings` left out: its codec modules repeat one boilerplate
docstring). So that the label does not leak, every identifier that contains a class's name or an alias of
it (`tkinter.ttk`, `Tk`, `_asyncio`, `email.mime.text`, `IDLE`, ...: `ALIASES`) is replaced by `___`, in
every item (another class's name would be as good a hint). Whitespace is collapsed and texts cut to
`max_chars` at a word boundary, so a 5-shot prompt fits a small model's context.

A docstring that occurs in two packages (after stripping) is dropped, one repeated within a package
kept once, so no text is in two splits. The split is stratified with the same number of validation and
test items per class (a balanced test set: chance is 1 / n_classes) and the rest for training, seeded
and independent of the order files are read in. The items depend on the Python version (its standard
library): `python_tag()` names it.

`pretraining_corpus` is stdlib-docs (one document per file, plus the help topics) without the docstrings
that became validation or test items, for masked-LM pre-training of the encoder: it never reads a
held-out text, not even unlabelled (it does read the package names in the training docstrings).
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from lmlab.data.sources import _docstrings, _pydoc_topics, _read_python_source, _stdlib_files, stdlib_root
from lmlab.errors import LmlabError

PLACEHOLDER = "___"
EXCLUDE = ("encodings",)
# names derived from a package's that would give it away: submodules/subpackages with distinctive
# names, the GUI toolkit and the IDE the package is named after. A package always stands for itself.
ALIASES: dict[str, tuple[str, ...]] = {
    "tkinter": ("tk", "tix"),                       # Tk, ttk, Tix, Tkinter
    "idlelib": ("idle",),
    "email": ("mime",),                             # email.mime
    "xml": ("sax", "minidom", "pulldom", "etree", "expat"),
    "lib2to3": ("2to3", "pgen", "pytree", "pygram", "fixer_"),
    "unittest": ("mock",),                          # unittest.mock
    "sqlite3": ("sqlite",),
    "multiprocessing": ("mp_",),
}


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str
    split: str  # train | val | test

    def as_dict(self) -> dict[str, str]:
        return {"text": self.text, "label": self.label, "split": self.split}


def aliases(packages: list[str]) -> list[str]:
    """Every name stripped from the texts of a task whose classes are `packages`, longest first."""
    names = {p.lower() for p in packages} | {a.lower() for p in packages for a in ALIASES.get(p, ())}
    return sorted(names, key=lambda s: (-len(s), s))


def strip_names(text: str, names: list[str]) -> str:
    """`text` with every identifier (dotted names included) that contains one of `names` (any case)
    replaced by PLACEHOLDER, and whitespace collapsed."""
    alt = "|".join(re.escape(n) for n in names)
    pattern = re.compile(rf"(?:\w+\.)*\w*(?:{alt})\w*(?:\.\w+)*", re.IGNORECASE)
    return " ".join(pattern.sub(PLACEHOLDER, text).split())


def leaks(text: str, names: list[str]) -> list[str]:
    """The names of `names` still in `text` (case-insensitive substrings): [] for a clean item."""
    low = text.lower()
    return [n for n in names if n.lower() in low]


def _cut(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    head = text[:max_chars + 1]
    return head[:head.rfind(" ")] if " " in head else text[:max_chars]


def _task_text(doc: str, names: list[str], max_chars: int) -> str:
    return _cut(strip_names(doc, names), max_chars)


def package_docstrings() -> Iterator[tuple[str, str]]:
    """(top-level package, docstring) of every module inside a package of the standard library, in
    sorted file order (top-level modules such as `os.py` belong to no package and are skipped)."""
    root = stdlib_root()
    for f in _stdlib_files(include_tests=False):
        parts = f.relative_to(root).parts
        if len(parts) < 2:
            continue
        source = _read_python_source(f)
        for doc in _docstrings(source) if source else []:
            yield parts[0], doc


def build_docstring_task(n_classes: int = 10, *, n_val: int = 15, n_test: int = 25, seed: int = 0,
                         max_chars: int = 400, min_words: int = 8) -> list[LabelledText]:
    """The labelled docstrings, stripped, cut and split (see the module docstring); train items first."""
    by_package: dict[str, set[str]] = defaultdict(set)
    raw = [(p, d) for p, d in package_docstrings() if p not in EXCLUDE]
    for package, doc in raw:
        if len(doc.split()) >= min_words:
            by_package[package].add(doc)
    ranked = sorted(by_package, key=lambda p: (-len(by_package[p]), p))
    classes = sorted(ranked[:n_classes])
    if len(classes) < n_classes:
        raise LmlabError(f"this Python's standard library has only {len(classes)} packages with docstrings")
    names = aliases(classes)
    seen: dict[str, set[str]] = defaultdict(set)  # stripped text -> packages it came from
    for package in classes:
        for doc in by_package[package]:
            text = _task_text(doc, names, max_chars)
            if len(text.split()) >= min_words:
                seen[text].add(package)
    per_class: dict[str, list[str]] = defaultdict(list)
    for text, packages in seen.items():
        if len(packages) == 1:  # in two packages: no right answer, and a leak between splits
            per_class[next(iter(packages))].append(text)
    out: list[LabelledText] = []
    for package in classes:
        texts = sorted(per_class[package])
        if len(texts) < n_val + n_test + 1:
            raise LmlabError(f"package {package} has {len(texts)} usable docstrings, fewer than "
                             f"n_val + n_test + 1 = {n_val + n_test + 1}")
        random.Random(f"{seed}/{package}").shuffle(texts)
        out += [LabelledText(t, package, "test") for t in texts[:n_test]]
        out += [LabelledText(t, package, "val") for t in texts[n_test:n_test + n_val]]
        out += [LabelledText(t, package, "train") for t in texts[n_test + n_val:]]
    order = {"train": 0, "val": 1, "test": 2}
    return sorted(out, key=lambda it: order[it.split])  # stable: within a split, by class then shuffle


def pretraining_corpus(items: list[LabelledText], max_chars: int = 400) -> list[str]:
    """stdlib-docs' documents with every docstring whose task text is a val/test item left out."""
    held_out = {it.text for it in items if it.split != "train"}
    names = aliases(sorted({it.label for it in items}))
    docs = []
    for f in _stdlib_files(include_tests=False):
        source = _read_python_source(f)
        kept = [d for d in (_docstrings(source) if source else []) if _task_text(d, names, max_chars) not in held_out]
        if kept:
            docs.append("\n\n".join(kept))
    return docs + _pydoc_topics()
