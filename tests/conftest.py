import json
import os
from pathlib import Path

import pytest
from peers import check_marks

from lmlab.data.prepare import PrepareConfig, prepare
from lmlab.data.sources import Corpus

os.environ.setdefault("LMLAB_NO_TENSORBOARD", "1")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """`@needs(...)` marks (tests/peers.py): a missing peer skips the test, or fails it under
    $LMLAB_REQUIRE_PEERS, before its fixtures are set up."""
    check_marks(item)


@pytest.fixture(scope="session")
def docs_jsonl(tmp_path_factory) -> Path:
    """About 300 kB of English prose from the built-in corpus, as a JSONL file."""
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    out, size = [], 0
    for doc in Corpus("stdlib-docs"):
        if size > 300_000:
            break
        out.append(json.dumps({"text": doc}))
        size += len(doc)
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def char_data(docs_jsonl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "char"
    prepare(PrepareConfig(source=str(docs_jsonl), out=str(out), tokenizer="char", min_count=1, vocab_size=0))
    return out


@pytest.fixture(scope="session")
def bpe_data(docs_jsonl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "bpe"
    prepare(PrepareConfig(source=str(docs_jsonl), out=str(out), tokenizer="bpe", vocab_size=512))
    return out


@pytest.fixture(scope="session")
def docs_lines() -> list[str]:
    """3,000 non-blank lines of the built-in English corpus, whitespace-normalised (n-gram tests)."""
    out: list[str] = []
    for doc in Corpus("stdlib-docs"):
        out += [" ".join(line.split()) for line in doc.splitlines() if line.strip()]
        if len(out) >= 3000:
            break
    return out[:3000]
