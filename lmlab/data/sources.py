"""Where text comes from: files, folders, globs, JSONL, and the two built-in stdlib corpora.

A *source* is a string: a path, a glob (`corpus/**/*.txt`), a `.jsonl` file (one document per
line, text under `jsonl_field`), or a built-in name:

* `stdlib-docs` — English prose: the docstrings of the running Python's standard library, read by
  parsing the source files with `ast` (never importing them), plus the `pydoc_data` help topics.
* `stdlib-code` — the standard library's source code itself (tests included, ~30 MB): a code corpus
  large enough for scaling experiments.

Built-in corpora differ between Python versions; each is built once, cached as JSONL under
`$LMLAB_CACHE_DIR` (default `~/.cache/lmlab`) and described with the version and a content hash.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import io
import json
import os
import platform
import sys
import sysconfig
import tokenize
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.utils.atomic import atomic_write_text

BUILTIN = ("stdlib-docs", "stdlib-code")
DOC_SPLITS = ("file", "paragraph", "line")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}


def cache_dir() -> Path:
    root = os.environ.get("LMLAB_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lmlab")
    return Path(root)


# ---------------------------------------------------------------------------------------------
# reading user files


def read_text_file(path: Path) -> str:
    """Read a UTF-8 text file, with a clear error for undecodable bytes."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmlabError(
            f"{path} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "convert it first, e.g. `iconv -f latin1 -t utf-8`") from None


def _split_text(text: str, doc_split: str) -> Iterator[str]:
    if doc_split == "file":
        parts = [text]
    elif doc_split == "line":
        parts = text.splitlines()
    else:  # paragraphs: blocks separated by blank lines
        parts = [p for p in _paragraphs(text)]
    for p in parts:
        if p.strip():
            yield p


def _paragraphs(text: str) -> Iterator[str]:
    buf: list[str] = []
    for line in text.splitlines():
        if line.strip():
            buf.append(line)
        elif buf:
            yield "\n".join(buf)
            buf = []
    if buf:
        yield "\n".join(buf)


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line of a UTF-8 JSONL file; bad JSON names its line."""
    for lineno, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise LmlabError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None


def _iter_jsonl(path: Path, field: str) -> Iterator[str]:
    for lineno, record in jsonl_records(path):
        if not isinstance(record, dict) or field not in record:
            raise LmlabError(f"{path}:{lineno}: no field '{field}' (choose it with --jsonl_field)")
        value = record[field]
        if not isinstance(value, str):
            raise LmlabError(f"{path}:{lineno}: field '{field}' is not a string")
        if value.strip():
            yield value


def resolve_files(source: str) -> list[Path]:
    """The files a path, folder or glob names, sorted; an error if there are none."""
    if any(ch in source for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(source, recursive=True)) if Path(p).is_file()]
        if not files:
            raise LmlabError(f"no files match '{source}'")
        return files
    p = Path(source)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise LmlabError(f"folder {p} holds no files")
        return files
    raise LmlabError(f"corpus not found: {source} (give a file, folder, glob, or one of {', '.join(BUILTIN)})")


# ---------------------------------------------------------------------------------------------
# the built-in corpora


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files(include_tests: bool) -> list[Path]:
    root = stdlib_root()
    out = []
    for f in sorted(root.rglob("*.py")):
        parts = set(f.relative_to(root).parts[:-1])
        if parts & _SKIP_DIRS or (not include_tests and parts & _TEST_DIRS):
            continue
        out.append(f)
    return out


def _read_python_source(path: Path) -> str | None:
    """Decode a source file by its PEP 263 declaration; None if it cannot be read as text."""
    try:
        data = path.read_bytes()
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        return data.decode(encoding)
    except (OSError, SyntaxError, UnicodeDecodeError, LookupError):
        return None


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                out.append(doc.strip())
    return out


def _pydoc_topics() -> list[str]:
    """The interactive help topics, read from pydoc_data/topics.py as a literal (not imported)."""
    path = stdlib_root() / "pydoc_data" / "topics.py"
    source = _read_python_source(path) if path.is_file() else None
    if source is None:
        return []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            return [topics[k].strip() for k in sorted(topics) if str(topics[k]).strip()]
    return []


def _build_stdlib_docs() -> Iterator[str]:
    for f in _stdlib_files(include_tests=False):
        source = _read_python_source(f)
        if source:
            docs = _docstrings(source)
            if docs:
                yield "\n\n".join(docs)
    yield from _pydoc_topics()


def _build_stdlib_code() -> Iterator[str]:
    for f in _stdlib_files(include_tests=True):
        source = _read_python_source(f)
        if source and source.strip():
            yield source


_BUILDERS: dict[str, Callable[[], Iterator[str]]] = {
    "stdlib-docs": _build_stdlib_docs,
    "stdlib-code": _build_stdlib_code,
}


def python_tag() -> str:
    return f"{platform.python_implementation().lower()}-{platform.python_version()}"


def builtin_corpus(name: str) -> Path:
    """Path of the cached JSONL for built-in corpus `name`, building it on first use."""
    path = cache_dir() / "corpora" / f"{name}-{python_tag()}.jsonl"
    if not path.is_file():
        lines = [json.dumps({"text": doc}, ensure_ascii=False) for doc in _BUILDERS[name]()]
        if not lines:
            raise LmlabError(f"built-in corpus {name} came out empty for this Python ({sys.executable})")
        atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# the one entry point


@dataclass(frozen=True)
class Corpus:
    """A re-iterable collection of documents (so it can be read once per preparation pass)."""

    source: str
    doc_split: str = "paragraph"
    jsonl_field: str = "text"

    def __post_init__(self) -> None:
        if self.doc_split not in DOC_SPLITS:
            raise LmlabError(f"doc_split must be one of {', '.join(DOC_SPLITS)}, got '{self.doc_split}'")

    def files(self) -> list[Path]:
        if self.source in BUILTIN:
            return [builtin_corpus(self.source)]
        return resolve_files(self.source)

    def __iter__(self) -> Iterator[str]:
        builtin = self.source in BUILTIN
        for f in self.files():
            if builtin:
                yield from _iter_jsonl(f, "text")
            elif f.suffix == ".jsonl":
                yield from _iter_jsonl(f, self.jsonl_field)
            else:
                yield from _split_text(read_text_file(f), self.doc_split)

    def describe(self) -> dict:
        """Provenance for meta.json: the source, the Python version, and a hash of the documents."""
        h = hashlib.sha256()
        n = 0
        for doc in self:
            h.update(doc.encode("utf-8"))
            h.update(b"\x00")
            n += 1
        return {"source": self.source, "doc_split": self.doc_split, "jsonl_field": self.jsonl_field,
                "python_version": platform.python_version(), "n_documents": n,
                "content_hash": "sha256:" + h.hexdigest()}
