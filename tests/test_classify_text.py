"""Text classification (issue 19's encoder-vs-LLM contrast): the stdlib docstring task, labelled-text
data, BERT's classification head, `lmlab train --init BERT_RUN` on labelled texts and `lmlab eval`."""

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmlab.cli import main
from lmlab.data.classify import TextClassBatches, TextClassSplit
from lmlab.data.docstring_task import PLACEHOLDER, aliases, build_docstring_task, leaks, strip_names
from lmlab.data.prepare import PrepareConfig, prepare
from lmlab.errors import LmlabError
from lmlab.eval.images import evaluate_classifier
from lmlab.io.checkpoint import resolve_checkpoint
from lmlab.io.load import load_model
from lmlab.models.registry import build, preset
from lmlab.tokenizers import BPETokenizer
from lmlab.train.init import load_init_weights

# --------------------------------------------------------------------------------------------------
# the task


@pytest.fixture(scope="module")
def task():
    return build_docstring_task(n_val=5, n_test=10, seed=0)


def test_no_class_name_or_alias_survives_in_any_text(task):
    names = aliases(sorted({it.label for it in task}))
    assert len({it.label for it in task}) == 10
    assert all(leaks(it.text, names) == [] for it in task)
    assert sum(PLACEHOLDER in it.text for it in task) > 50  # names were there, and were stripped


def test_strip_names_takes_whole_identifiers_in_any_case():
    names = aliases(["tkinter", "email"])
    text = "Use tkinter.ttk.Button or Tk() and _tkinter; see EMAIL.mime.text for Emails."
    assert strip_names(text, names) == "Use ___ or ___() and ___; see ___ for ___."
    assert strip_names("a   b\n c", names) == "a b c"


def test_split_is_deterministic_disjoint_and_balanced(task):
    again = build_docstring_task(n_val=5, n_test=10, seed=0)
    assert again == task
    other = build_docstring_task(n_val=5, n_test=10, seed=1)
    assert {it.text for it in other if it.split == "test"} != {it.text for it in task if it.split == "test"}
    by_split = {s: [it.text for it in task if it.split == s] for s in ("train", "val", "test")}
    assert all(len(v) == len(set(v)) for v in by_split.values())
    assert not set(by_split["train"]) & set(by_split["test"])
    assert not set(by_split["val"]) & (set(by_split["test"]) | set(by_split["train"]))
    for split, n in (("val", 5), ("test", 10)):
        counts = {lab: sum(it.split == split and it.label == lab for it in task) for lab in {it.label for it in task}}
        assert set(counts.values()) == {n}


# --------------------------------------------------------------------------------------------------
# labelled-text data and the classification head

WORDS = "the a of to is in it for on with as at by an be this that from or".split()


def make_items(n: int, seed: int) -> list[dict]:
    """Separable by one word: 'red' -> warm, 'blue' -> cold, among random filler."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = ["warm", "cold"][i % 2]
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
        words.insert(rng.randrange(len(words) + 1), "red" if label == "warm" else "blue")
        out.append({"text": " ".join(words), "label": label})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    items = make_items(240, 0)
    texts = [it["text"] for it in items]
    tok = BPETokenizer.train(texts, vocab_size=120, min_count=1)
    tok.save(str(root / "tok"))
    (root / "corpus.txt").write_text("\n\n".join(texts))
    (root / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    text_data = prepare(PrepareConfig(source=str(root / "corpus.txt"), out=str(root / "text"),
                                      tokenizer=str(root / "tok")))
    cls_data = prepare(PrepareConfig(source=str(root / "items.jsonl"), format="classify", out=str(root / "cls"),
                                     tokenizer=str(root / "tok"), val_fraction=0.25, test_fraction=0.25))
    return {"root": root, "tok": tok, "text": text_data, "cls": cls_data}


def test_prepared_split_is_stratified_and_batches_resume(tiny):
    meta = json.loads((tiny["cls"] / "meta.json").read_text())
    assert meta["model"] == {"n_classes": 2, "labels": ["cold", "warm"]}
    assert meta["splits"]["test"]["per_class"] == [30, 30] and meta["splits"]["train"]["n"] == 120
    split = TextClassSplit(tiny["cls"], "train")
    b = split.batch(np.arange(4))
    assert (b["input_ids"][:, 0] == tiny["tok"].eos_id).all()
    assert torch.equal(b["attention_mask"].sum(1), torch.from_numpy((split.tokens[:4] >= 0).sum(1)))
    s = TextClassBatches(split, 8, seed=3)
    s.next_batch()
    state = s.state_dict()
    want = s.next_batch()
    t = TextClassBatches(split, 8, seed=0)
    t.load_state_dict(state)
    got = t.next_batch()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_bad_labelled_lines_are_named(tmp_path, tiny):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b", "label": "x"}\n{"text": "c d"}\n')
    with pytest.raises(LmlabError, match="bad.jsonl:2"):
        prepare(PrepareConfig(source=str(bad), format="classify", out=str(tmp_path / "o"),
                              tokenizer=str(tiny["root"] / "tok")))


def classifier(n_classes: int = 3, pool: str = "cls", vocab: int = 50):
    torch.manual_seed(0)
    cfg = preset("bert-tiny")
    cfg.vocab_size, cfg.n_classes, cfg.labels, cfg.pool, cfg.dropout = vocab, n_classes, ["a", "b", "c"], pool, 0.0
    return build(cfg).eval()


def test_head_loss_is_cross_entropy_and_mean_pool_ignores_padding():
    model = classifier(pool="mean")
    assert model.objective == "classify_text"
    x = torch.randint(5, 50, (3, 7))
    labels = torch.tensor([0, 2, 1])
    out = model(x, labels=labels)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, labels))
    padded = torch.cat([x, torch.zeros(3, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(3, 7), torch.zeros(3, 4)], 1).long()
    torch.testing.assert_close(model(padded, attention_mask=mask).logits, out.logits, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def mlm_run(tiny):
    run = tiny["root"] / "mlm"
    assert main(["train", "--model", "bert-tiny", "--data", str(tiny["text"]), "--out", str(run),
                 "--train.max_steps=2", "--train.batch_size=4", "--train.progress=false", "--train.eval_interval=0",
                 "--model.block_size=32"]) == 0
    return run


def test_init_from_an_mlm_encoder_loads_all_but_the_new_head(mlm_run):
    encoder = load_model(mlm_run).model
    cfg = encoder.config
    cfg.n_classes, cfg.labels = 2, ["cold", "warm"]
    torch.manual_seed(1)
    model = build(cfg)
    head = model.classifier.weight.clone()
    load_init_weights(model, mlm_run)
    ref = encoder.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items() if k in ref)
    assert torch.equal(model.classifier.weight, head)


def test_bert_from_mlm_learns_a_separable_task_and_eval_reports_accuracy(tiny, mlm_run, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--init", str(mlm_run), "--data", str(tiny["cls"]), "--out", str(run), "--model.pool=mean",
                 "--train.max_steps=60", "--train.batch_size=16", "--train.lr=3e-3", "--train.warmup_steps=5",
                 "--train.progress=false", "--train.eval_interval=0", "--train.seed=0", "--model.dropout=0.0"]) == 0
    loaded = load_model(run)
    assert loaded.model.config.labels == ["cold", "warm"] and loaded.model.config.pool == "mean"
    test = TextClassSplit(tiny["cls"], "test", max_len=32)
    res = evaluate_classifier(loaded.model, test, batch_size=7)
    b = test.batch(np.arange(len(test)))
    pred = loaded.model(b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
    assert res.accuracy == pytest.approx(float((pred == b["labels"]).float().mean()))
    assert res.accuracy >= 0.95 and sum(map(sum, res.confusion)) == len(test) == 60
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert main(["eval", str(resolve_checkpoint(run)), "--split", "test", "--json", str(out)]) == 0
    assert "accuracy" in capsys.readouterr().out
    got = json.loads(out.read_text())
    assert got["accuracy"] == pytest.approx(res.accuracy) and got["accuracy_interval_95"][0] < res.accuracy


def test_a_decoder_does_not_train_on_labelled_texts(tiny, tmp_path, capsys):
    assert main(["train", "--model", "tiny", "--data", str(tiny["cls"]), "--out", str(tmp_path / "r"),
                 "--train.max_steps=1"]) != 0
    assert "holds labelled texts; 'gpt' models do not classify text" in capsys.readouterr().err


def test_pretraining_corpus_leaves_out_every_held_out_docstring(task):
    from lmlab.data.docstring_task import pretraining_corpus

    corpus = " ".join(" ".join(pretraining_corpus(task)).split())
    # held-out texts with nothing stripped or cut are their docstrings, whitespace collapsed
    plain = [it.text for it in task if it.split != "train" and PLACEHOLDER not in it.text and len(it.text) < 300]
    assert len(plain) > 20
    assert not [t for t in plain if t in corpus]
    assert sum(it.text in corpus for it in task if it.split == "train" and PLACEHOLDER not in it.text) > 100


def test_chat_scoring_reads_what_sft_trains_on_a_smollm2_conversation(task):
    from peers import smollm2_gguf

    from lmlab.data.chat import chat_tokenizer, encode_chat
    from lmlab.eval.tasks.packages import chat_pairs, conversation, fewshot_task
    from lmlab.tokenizers.chat_template import chat_template_for

    tok, bos = chat_tokenizer(smollm2_gguf())
    template = chat_template_for(tok)
    labels = sorted({it.label for it in task})
    item = next(it for it in task if it.split == "test")
    pairs = chat_pairs(template, tok, bos, item, labels)
    assert len({tuple(c) for c, _ in pairs}) == 1  # one prompt, ten replies
    assert [tok.decode(x) for _, x in pairs] == [f"{lab}<|im_end|>\n" for lab in labels]
    ids, trained = encode_chat(template, tok, conversation(item, labels), bos)
    gold = pairs[labels.index(item.label)]
    assert gold[0] + gold[1] == ids and sum(trained) == len(gold[1])
    fs = fewshot_task(task)
    assert len(fs.items) == 100 and len(fs.pool) == sum(it.split == "train" for it in task)
    assert all(fs.items[i].choices[fs.items[i].gold] == it.label
               for i, it in enumerate(it for it in task if it.split == "test"))
