import json
import sys

import numpy as np
import pytest

from lmlab.data import sources
from lmlab.data.prepare import PrepareConfig, prepare, read_meta
from lmlab.data.sources import Corpus
from lmlab.data.stream import RandomWindows, SequentialWindows, TokenSplit
from lmlab.errors import LmlabError
from lmlab.tokenizers import load_tokenizer


def _docs(n=30):
    return [f"Document number {i} talks about topic {i % 7}.\nIt has a second line {i * 13}." for i in range(n)]


def test_shards_round_trip_every_document_once(tmp_path):
    src = tmp_path / "c.jsonl"
    docs = _docs()
    src.write_text("\n".join(json.dumps({"body": d}) for d in docs))
    out = prepare(PrepareConfig(source=str(src), out=str(tmp_path / "d"), tokenizer="char", jsonl_field="body",
                                val_fraction=0.1, test_fraction=0.1, shard_tokens=500))
    meta = read_meta(out)
    tok = load_tokenizer(out)
    assert meta["dtype"] == "uint16"
    assert len(meta["splits"]["train"]["shards"]) > 1  # shard_tokens forces several files
    decoded = []
    for split in ("train", "val", "test"):
        ts = TokenSplit(out, split)
        assert all(isinstance(s, np.memmap) for s in ts.shards)
        text = tok.decode(ts.tokens().tolist())
        decoded += [d for d in text.split("</s>") if d]
        assert meta["splits"][split]["n_bytes"] == sum(len(d.encode()) + 1 for d in text.split("</s>") if d)
    assert sorted(decoded) == sorted(docs)  # whole documents, each in exactly one split
    assert meta["splits"]["val"]["n_docs"] == 3 and meta["splits"]["test"]["n_docs"] == 3


def test_split_is_deterministic_and_seeded(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("\n\n".join(_docs(40)))
    a = prepare(PrepareConfig(source=str(src), out=str(tmp_path / "a"), tokenizer="char"))
    b = prepare(PrepareConfig(source=str(src), out=str(tmp_path / "b"), tokenizer="char"))
    c = prepare(PrepareConfig(source=str(src), out=str(tmp_path / "c"), tokenizer="char", seed=7))
    val = lambda d: TokenSplit(d, "val").tokens().tolist()  # noqa: E731
    assert val(a) == val(b)
    assert val(a) != val(c)
    assert read_meta(a)["corpus"]["content_hash"] == read_meta(c)["corpus"]["content_hash"]


def test_large_vocabulary_uses_uint32(tmp_path):
    words = [f"w{i}" for i in range(80_000)]
    src = tmp_path / "many.txt"
    src.write_text("\n".join(" ".join(words[i:i + 100]) for i in range(0, len(words), 100)))
    out = prepare(PrepareConfig(source=str(src), out=str(tmp_path / "d"), tokenizer="word", min_count=1,
                                vocab_size=0, doc_split="line"))
    meta = read_meta(out)
    assert meta["vocab_size"] > 2**16 and meta["dtype"] == "uint32"
    ts = TokenSplit(out, "train")
    assert ts.shards[0].dtype == np.uint32 and ts.tokens().max() >= 2**16


def test_folder_and_glob_sources(tmp_path):
    (tmp_path / "txt" / "sub").mkdir(parents=True)
    for i, d in enumerate(_docs(6)):
        (tmp_path / "txt" / ("sub" if i % 2 else "") / f"{i}.txt").write_text(d)
    (tmp_path / "txt" / ".hidden").write_text("never read")
    folder = list(Corpus(str(tmp_path / "txt"), doc_split="file"))
    globbed = list(Corpus(str(tmp_path / "txt" / "**" / "*.txt"), doc_split="file"))
    assert sorted(folder) == sorted(globbed) == sorted(_docs(6))
    assert list(Corpus(str(tmp_path / "txt" / "0.txt"), doc_split="line")) == _docs(6)[0].splitlines()


def test_builtin_corpus_is_cached_with_provenance(bpe_data):
    meta = read_meta(bpe_data)
    assert meta["corpus"]["content_hash"].startswith("sha256:")
    path = sources.builtin_corpus("stdlib-docs")
    assert path.is_file() and sources.python_tag() in path.name
    assert sources.builtin_corpus("stdlib-docs") == path  # second call reuses the cache


def test_stdlib_docs_are_parsed_not_imported(tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "pkg" / "__init__.py").write_text('"""Package doc."""\n')
    (lib / "boom.py").write_text('"""Module doc."""\nraise SystemExit("imported!")\n'
                                 'def f():\n    """Function doc."""\n')
    (lib / "test").mkdir()
    (lib / "test" / "test_x.py").write_text('"""Test doc."""\n')
    (lib / "pydoc_data").mkdir()
    (lib / "pydoc_data" / "topics.py").write_text("topics = {'b': 'Topic B.', 'a': 'Topic A.'}\n")
    monkeypatch.setattr(sources, "stdlib_root", lambda: lib)
    docs = list(sources._build_stdlib_docs())
    assert "boom" not in sys.modules
    assert "Module doc.\n\nFunction doc." in docs and "Package doc." in docs
    assert "Test doc." not in docs  # tests are code, not prose
    assert docs[-2:] == ["Topic A.", "Topic B."]
    code = list(sources._build_stdlib_code())
    assert any("raise SystemExit" in c for c in code) and '"""Test doc."""\n' in code


@pytest.mark.parametrize("sampler_cls", [RandomWindows, SequentialWindows])
def test_sampler_state_resumes_exactly(char_data, sampler_cls):
    split = TokenSplit(char_data, "train")
    a = sampler_cls(split, 32, 4, seed=3)
    for _ in range(5):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # must be plain data
    expected = [a.next_batch() for _ in range(3)]
    b = sampler_cls(split, 32, 4, seed=99)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, [b.next_batch() for _ in range(3)]):
        assert (x1 == x2).all() and (y1 == y2).all()
        assert (x1[:, 1:] == y1[:, :-1]).all()


def test_sequential_windows_cover_the_split_in_order(char_data):
    split = TokenSplit(char_data, "val")
    s = SequentialWindows(split, 16, 2)
    x, y = s.next_batch()
    toks = split.tokens()
    assert x[0].tolist() == toks[:16].tolist() and x[1].tolist() == toks[16:32].tolist()
    assert y[1].tolist() == toks[17:33].tolist()


# -- bad input ---------------------------------------------------------------------------------


def _no_leftovers(tmp_path, name="out"):
    return not any(p.name.startswith(f".{name}") or p.name == name for p in tmp_path.iterdir())


@pytest.mark.parametrize("case", ["missing", "empty", "blank", "latin1", "jsonl_field", "no_glob_match"])
def test_bad_corpora_give_clear_errors_and_write_nothing(tmp_path, case):
    src = tmp_path / "in.txt"
    if case == "empty":
        src.write_text("")
    elif case == "blank":
        src.write_text("\n   \n\n")
    elif case == "latin1":
        src.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    elif case == "jsonl_field":
        src = tmp_path / "in.jsonl"
        src.write_text('{"text": "fine"}\n{"body": "oops"}\n')
    elif case == "no_glob_match":
        src = tmp_path / "*.nothing"
    expected = {"missing": "not found", "empty": "empty", "blank": "empty", "latin1": "not valid UTF-8",
                "jsonl_field": r"in.jsonl:2: no field 'text'", "no_glob_match": "no files match"}[case]
    with pytest.raises(LmlabError, match=expected):
        prepare(PrepareConfig(source=str(src), out=str(tmp_path / "out")))
    assert _no_leftovers(tmp_path)


def test_tokenizer_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(_docs()))
    import lmlab.data.prepare as prep

    def boom(*a, **k):
        raise LmlabError("disk on fire")

    monkeypatch.setattr(prep.ShardWriter, "close", boom)
    with pytest.raises(LmlabError, match="disk on fire"):
        prepare(PrepareConfig(source=str(src), out=str(tmp_path / "out"), tokenizer="char"))
    assert _no_leftovers(tmp_path)


def test_existing_data_dir_is_not_overwritten(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(_docs()))
    out = prepare(PrepareConfig(source=str(src), out=str(tmp_path / "d"), tokenizer="char"))
    stamp = (out / "meta.json").read_bytes()
    with pytest.raises(LmlabError, match="already exists"):
        prepare(PrepareConfig(source=str(src), out=str(out), tokenizer="word"))
    assert (out / "meta.json").read_bytes() == stamp


def test_too_few_documents(tmp_path):
    src = tmp_path / "one.txt"
    src.write_text("just one paragraph")
    with pytest.raises(LmlabError, match="too few"):
        prepare(PrepareConfig(source=str(src), out=str(tmp_path / "out")))


def test_given_split_files_are_prepared_whole(tmp_path):
    """--splits=files: each of a folder's train/valid/test files is one split, encoded whole (PTB's setup)."""
    src = tmp_path / "corpus"
    src.mkdir()
    lines = {"train": "a b c\nb c d\n", "valid": "a d\n", "test": "c c e\n"}
    for name, text in lines.items():
        (src / f"toy.{name}.txt").write_text(text, encoding="utf-8")
    out = prepare(PrepareConfig(source=str(src), out=str(tmp_path / "d"), splits="files", tokenizer="word",
                                min_count=1, vocab_size=0))
    meta, tok = read_meta(out), load_tokenizer(out)
    assert "e" not in tok.stoi  # the tokenizer knows the training words only
    for split, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        assert TokenSplit(out, split).tokens().tolist() == tok.encode(lines[name])
        assert meta["splits"][split]["n_docs"] == lines[name].count("\n")
    (src / "toy.dev.txt").write_text("x\n", encoding="utf-8")  # a second validation file: ambiguous
    with pytest.raises(LmlabError, match="exactly one val file"):
        prepare(PrepareConfig(source=str(src), out=str(tmp_path / "e"), splits="files", tokenizer="word"))
    assert not (tmp_path / "e").exists()
    with pytest.raises(LmlabError, match="unknown splits"):
        prepare(PrepareConfig(source=str(src), out=str(tmp_path / "f"), splits="random"))
