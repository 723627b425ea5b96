"""Supervised fine-tuning data (lmlab/data/chat.py) and packed attention (document_ids in the decoder):
the loss mask on a real SmolLM2 conversation, packed loss = sum of the conversations' losses alone,
no attention across conversations, bad lines named file:line, and an SFT run through the CLI."""

import dataclasses
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peers import require_module, smollm2_gguf

from lmlab.cli import main
from lmlab.data.chat import IGNORE, PackedChats, encode_chat, read_chats
from lmlab.data.stream import TokenSplit
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import list_checkpoints
from lmlab.models.registry import build
from lmlab.models.transformer.llama import LlamaConfig
from lmlab.nn.position import position_ids_from_documents
from lmlab.tokenizers import load_tokenizer
from lmlab.tokenizers.chat_template import ChatTemplate

BLOCK = 160


def _conversations(n: int, seed: int = 0) -> list[dict]:
    r = random.Random(seed)
    out = []
    for i in range(n):
        a, b = r.randint(0, 99), r.randint(0, 99)
        msgs = [{"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"It is {a + b}."}]
        if i % 3 == 0:  # multi-turn, with a system prompt of its own
            msgs = [{"role": "system", "content": "Answer briefly."}, *msgs,
                    {"role": "user", "content": "And twice that?"}, {"role": "assistant", "content": str(2 * (a + b))}]
        out.append({"messages": msgs})
    return out


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    """Chat data prepared through the CLI with the real SmolLM2 GGUF's tokenizer and chat template."""
    require_module("gguf")
    gguf = smollm2_gguf()
    d = tmp_path_factory.mktemp("sft")
    (d / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in _conversations(40)))
    assert main(["prepare", str(d / "chat.jsonl"), "--format", "chat", "--tokenizer", str(gguf),
                 "--out", str(d / "data")]) == 0
    return d / "data"


def _template(data) -> ChatTemplate:
    meta = json.loads((data / "meta.json").read_text())
    tok = load_tokenizer(data)
    return ChatTemplate(meta["chat"]["template"], bos_token=tok.specials.bos, eos_token=tok.specials.eos), tok


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of True."""
    runs, start = [], None
    for i, f in enumerate([*flags, False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_smollm2_conversation_trains_exactly_the_assistant_tokens(sft_data):
    template, tok = _template(sft_data)
    messages = [{"role": "user", "content": "Name a prime number."},
                {"role": "assistant", "content": "Seven is prime."},
                {"role": "user", "content": "Another one?"},
                {"role": "assistant", "content": "Eleven, as well."}]
    ids, trained = encode_chat(template, tok, messages)
    text = template.render(messages, add_generation_prompt=False)
    assert "You are a helpful AI assistant named SmolLM" in text  # the template's default system prompt
    assert tok.decode(ids) == text
    # the pieces tokenized apart give the ids of the whole render: what `lmlab chat` feeds the model
    assert ids == tok.encode(text, allow_special=True)
    # every trained run is one assistant turn: its content and the end of turn, nothing else
    spans = [tok.decode(ids[s:e]) for s, e in _runs(trained)]
    assert spans == ["Seven is prime.<|im_end|>\n", "Eleven, as well.<|im_end|>\n"]
    for content, (s, _) in zip(["Seven is prime.", "Eleven, as well."], _runs(trained)):
        n = len(tok.encode(content))
        assert ids[s:s + n] == tok.encode(content) and all(trained[s:s + n])
    # and every untrained token is outside the assistant's replies: system prompt, user turns, headers
    untrained = "".join(tok.decode(ids[s:e]) for s, e in _runs([not t for t in trained]))
    assert untrained == text.replace("Seven is prime.<|im_end|>\n", "").replace("Eleven, as well.<|im_end|>\n", "")


def test_prepared_masks_cover_the_assistant_turns_only(sft_data):
    meta = json.loads((sft_data / "meta.json").read_text())
    info = meta["chat"]["splits"]["train"]
    tok = load_tokenizer(sft_data)
    ids = TokenSplit(sft_data, "train").tokens()
    mask = np.fromfile(sft_data / info["masks"][0]["file"], dtype=np.uint8).astype(bool)
    starts = np.fromfile(sft_data / info["starts"], dtype=np.int64)
    assert len(mask) == len(ids) == starts[-1] and info["n_conversations"] == len(starts) - 1
    assert info["n_trained"] == mask.sum() > 0
    spans = [tok.decode(ids[s:e].tolist()) for s, e in _runs(mask.tolist())]
    assert all(span.endswith("<|im_end|>\n") and "<|im_start|>" not in span for span in spans)
    assert sum(s.startswith("It is ") for s in spans) == info["n_conversations"]


def _tiny_llama(attention: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, mlp_hidden=64, vocab_size=49152,
                      block_size=BLOCK, attention=attention, loss_chunk_size=0,
                      init_std=0.3)  # far from uniform outputs, so a leak across conversations shows
    return build(cfg).eval()


def _alone(sampler: PackedChats, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    s, e = sampler.conversations[i]
    x = torch.as_tensor(sampler.tokens[s:e - 1])
    y = torch.as_tensor(np.where(sampler.trained[s + 1:e], sampler.tokens[s + 1:e], IGNORE))
    return x, y


def _packed_row(sampler: PackedChats, n: int = 3) -> list[int]:
    row = next(r for r in sampler._pack(0) if len(r) >= n)
    return row


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_is_the_sum_of_the_conversations_losses(sft_data, attention):
    sampler = PackedChats(TokenSplit(sft_data, "train"), BLOCK, 2, shuffle=False)
    row = _packed_row(sampler)
    batch = sampler.row_tensors(row)
    model = _tiny_llama(attention)
    with torch.no_grad():
        out = model(batch["input_ids"][None], document_ids=batch["document_ids"][None])
        packed = F.cross_entropy(out.logits[0].double(), batch["targets"], ignore_index=IGNORE, reduction="sum")
        alone = sum(F.cross_entropy(model(x[None]).logits[0].double(), y, ignore_index=IGNORE, reduction="sum")
                    for x, y in (_alone(sampler, i) for i in row))
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
        # the model's own (mean) loss over the trained targets agrees, and the row's padding is not trained
        n = int((batch["targets"] != IGNORE).sum())
        loss = model(batch["input_ids"][None], batch["targets"][None], document_ids=batch["document_ids"][None]).loss
        assert math.isclose(float(loss) * n, float(alone), rel_tol=1e-5)
        # without the document ids the same row scores differently (the test can fail)
        leaky = F.cross_entropy(model(batch["input_ids"][None]).logits[0].double(), batch["targets"],
                                ignore_index=IGNORE, reduction="sum")
        assert abs(float(leaky - alone)) > 1.0


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_no_attention_across_packed_conversations(sft_data, attention):
    sampler = PackedChats(TokenSplit(sft_data, "train"), BLOCK, 2, shuffle=False)
    batch = sampler.row_tensors(_packed_row(sampler))
    x, doc = batch["input_ids"][None], batch["document_ids"][None]
    first = doc[0] == 0
    changed = x.clone()
    changed[0, first] = torch.randint(0, 49152, (int(first.sum()),), generator=torch.Generator().manual_seed(1))
    model = _tiny_llama(attention)
    with torch.no_grad():
        a, b = model(x, document_ids=doc).logits[0], model(changed, document_ids=doc).logits[0]
    assert not torch.allclose(a[first], b[first])  # conversation 1 changed ...
    torch.testing.assert_close(a[~first], b[~first], rtol=0, atol=0)  # ... the others did not see it


def test_positions_restart_per_document():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 3], [5, 5, 5, 5, 5, 5, 5, 5]])
    assert position_ids_from_documents(doc).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


def test_packed_sampler_resumes_exactly(sft_data):
    data = TokenSplit(sft_data, "train")
    a = PackedChats(data, BLOCK, 3, seed=5)
    for _ in range(4):  # past the end of the first epoch
        a.next_batch()
    b = PackedChats(data, BLOCK, 3, seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        ba, bb = a.next_batch(), b.next_batch()
        assert all(torch.equal(ba[k], bb[k]) for k in ("input_ids", "targets", "document_ids"))
    # every conversation appears once per epoch, rows no longer than the block
    rows = a._pack(7)
    assert sorted(i for r in rows for i in r) == list(range(len(a.conversations)))
    assert all(sum(e - s - 1 for s, e in (a.conversations[i] for i in r)) <= BLOCK for r in rows)


BAD_LINES = {
    "not json": ('{"messages": [', "invalid JSON"),
    "no messages": ('{"text": "hi"}', "\"messages\""),
    "empty list": ('{"messages": []}', "non-empty"),
    "bad role": ('{"messages": [{"role": "bot", "content": "hi"}]}', "role 'bot'"),
    "empty content": ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}',
                      "empty"),
    "no assistant": ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_lines_are_named_with_file_and_line(tmp_path, case, capsys):
    line, why = BAD_LINES[case]
    good = json.dumps(_conversations(1)[0])
    path = tmp_path / "chat.jsonl"
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n")
    with pytest.raises(LmlabError, match=rf"chat.jsonl:4: .*{why}"):
        read_chats(path)
    # through the CLI: the error, not a traceback, and a non-zero exit (read before any tokenizer loads)
    assert main(["prepare", str(path), "--format", "chat", "--tokenizer", str(tmp_path / "no-model.gguf"),
                 "--out", str(tmp_path / "out")]) != 0
    assert f"{path}:4" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sft_run_through_the_cli(sft_data, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data", str(sft_data), "--out", str(run), "--model", "llama-tiny",
                 f"--model.block_size={BLOCK}", "--train.batch_size=2", "--train.max_steps=8", "--train.lr=3e-3",
                 "--train.warmup_steps=2", "--train.eval_iters=2", "--train.log_interval=1",
                 "--train.progress=false"]) == 0
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert any("val_loss" in r for r in rows)
    assert [p.name for p in list_checkpoints(run)] == ["step-000008"]


def test_instruction_pairs_avoid_the_test_items_and_the_held_out_family(tmp_path):
    from lmlab.eval.tasks import load_task
    from lmlab.eval.tasks.instructions import FAMILIES, conversation, instruction_pairs

    train_tasks, held_family = ["arithmetic_2d+", "arithmetic_2dx", "counting"], FAMILIES["sequences"][1:]
    evals = {n: load_task(n, 50, seed=0) for n in train_tasks + held_family}
    pairs = instruction_pairs(train_tasks, 200, seed=0, held_out=evals)
    assert {p["task"] for p in pairs} == set(train_tasks) and len(pairs) > 400
    for name in train_tasks:  # no test question in the training pairs, nor one twice
        tests = {conversation(evals[name], it)[1]["content"] for it in evals[name].items}
        users = [p["messages"][1]["content"] for p in pairs if p["task"] == name]
        assert not tests & set(users) and len(users) == len(set(users))
    path = tmp_path / "pairs.jsonl"  # valid chat lines, each answered by the assistant
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    assert all(c.messages[-1]["role"] == "assistant" for c in read_chats(path))


def test_k_shot_pairs_show_training_demonstrations_only():
    from lmlab.eval.harness.fewshot import build_prompt
    from lmlab.eval.tasks import load_task
    from lmlab.eval.tasks.instructions import INSTRUCTIONS, conversation, instruction_pairs

    name = "arithmetic_2d-"
    evals = {name: load_task(name, 50, seed=0)}
    pairs = instruction_pairs([name], 60, seed=3, held_out=evals, shots=(0, 3))
    assert {p["shots"] for p in pairs} == {0, 3} and len(pairs) == 60
    tests = {it.context for it in evals[name].items}
    for p in pairs:  # the question and its demonstrations: k + 1 distinct items, none a test item
        user = p["messages"][1]["content"]
        shown = ["Q:" + q for q in user.split("Q:")[1:]]
        assert len(shown) == p["shots"] + 1 and len(set(shown)) == len(shown)
        assert not any(t in user for t in tests)
    # 0-shot turns are the plain conversation; k-shot turns join demonstrations as the plain few-shot prompt does
    task, item = evals[name], evals[name].items[0]
    assert conversation(task, item, demos=()) == conversation(task, item)
    demos = task.pool[:2]
    want = INSTRUCTIONS["arithmetic"] + build_prompt(task, item, demos)
    assert conversation(task, item, demos=demos)[1]["content"] == want


@pytest.fixture(scope="module")
def gensim_words():
    """The real questions-words.txt that gensim ships (found, not imported, by lmlab.eval.tasks.words)."""
    from lmlab.eval.tasks.words import default_file

    require_module("gensim")
    return str(default_file())


def test_word_question_tasks_answer_from_the_file_and_split_it_three_ways(gensim_words):
    from lmlab.eval.tasks import load_task
    from lmlab.eval.tasks.instructions import FAMILIES, family_of
    from lmlab.eval.tasks.words import QUESTION_POOL, word_pairs

    assert FAMILIES["words"] == ["capital_of", "currency_of", "nationality_of", "plural_of", "comparative_of"]
    known = {("capital_of", "Greece"): "Athens", ("capital_of", "Japan"): "Tokyo", ("currency_of", "Japan"): "yen",
             ("nationality_of", "Netherlands"): "Dutch", ("plural_of", "mouse"): "mice",
             ("comparative_of", "good"): "better"}
    question = {"capital_of": "the capital of {}", "currency_of": "the currency of {}",
                "nationality_of": "the adjective for people from {}", "plural_of": "the plural of {}",
                "comparative_of": "the comparative form of {}"}
    for name in FAMILIES["words"]:
        assert family_of(name) == "words"
        pairs = word_pairs(name, gensim_words)
        test = load_task(name, 1000, seed=0, words_file=gensim_words)
        val = load_task(name, 1000, seed=0, words_file=gensim_words, split="validation")
        assert test.kind == "generation" and val.pool == test.pool and len(test.pool) == QUESTION_POOL
        parts = [[it.context for it in p] for p in (test.pool, val.items, test.items)]
        # every key asked exactly once: pool, validation and test parts are disjoint and cover the file
        assert sum(map(len, parts)) == len(pairs) == len(set(sum(parts, [])))
        assert len(test.items) > 2 * len(val.items) > 0
        for it in test.pool + val.items + test.items:
            key = it.context.removeprefix(f"Q: What is {question[name].format('')}").removesuffix("?\n\nA:")
            assert it.context == f"Q: What is {question[name].format(key)}?\n\nA:" and it.target == pairs[key]
        for (task, key), answer in known.items():
            if task == name:
                assert pairs[key] == answer
                assert _answer_for(test, val, key, name) == answer
        # deterministic from the seed; another seed splits the questions otherwise; asking for fewer keeps the first
        again = load_task(name, 1000, seed=0, words_file=gensim_words)
        assert again.items == test.items and again.pool == test.pool
        assert load_task(name, 5, seed=0, words_file=gensim_words).items == test.items[:5]
        assert load_task(name, 1000, seed=1, words_file=gensim_words).items != test.items
    with pytest.raises(LmlabError, match="split"):
        load_task("plural_of", 5, seed=0, words_file=gensim_words, split="train")


def _answer_for(test, val, key: str, name: str) -> str:  # what the task's items answer for `key`
    hits = [it.target for it in test.pool + val.items + test.items if it.context.endswith(f" {key}?\n\nA:")]
    assert len(hits) == 1, (name, key, hits)
    return hits[0]


def test_words_family_pairs_avoid_its_test_questions_and_chat_turns_ask_for_one_word(gensim_words):
    from lmlab.eval.tasks import load_task
    from lmlab.eval.tasks.instructions import FAMILIES, conversation, instruction_pairs

    names = FAMILIES["words"]
    evals = {n: load_task(n, 200, seed=0) for n in names}  # as benchmarks/sft_instructions.py loads them
    pairs = instruction_pairs(names, 250, seed=0, held_out=evals)
    for name in names:  # trained when another family is held out: never on a test question, none twice
        users = [p["messages"][1]["content"] for p in pairs if p["task"] == name]
        tests = {conversation(evals[name], it)[1]["content"] for it in evals[name].items}
        assert users and not tests & set(users) and len(users) == len(set(users))
    task, item = evals["capital_of"], evals["capital_of"].items[0]
    msgs = conversation(task, item)
    assert msgs[1]["content"] == "Answer the question with one word.\n" + item.context
    assert msgs[2] == {"role": "assistant", "content": item.target}
    # held out: the other three families' pairs ask no question of this family
    others = [n for f in ("arithmetic", "scramble", "sequences") for n in FAMILIES[f]]
    held = {n: load_task(n, 60, seed=0) for n in others}
    trained = instruction_pairs(others, 20, seed=0, held_out=held)
    asked = {p["messages"][1]["content"] for p in trained}
    assert not any(it.context in a for n in names for it in evals[n].items + evals[n].pool for a in asked)


def test_geography_and_lexicon_regroup_the_word_relations_and_lexicon_pairs_ask_no_place_question(gensim_words):
    from lmlab.eval.tasks import load_task
    from lmlab.eval.tasks.instructions import FAMILIES, conversation, family_of, instruction_pairs
    from lmlab.eval.tasks.words import word_pairs

    geo, lex = FAMILIES["geography"], FAMILIES["lexicon"]
    assert not set(geo) & set(lex) and set(FAMILIES["words"]) <= set(geo) | set(lex)
    assert {family_of(n) for n in lex} == {"words", "lexicon"}  # one instruction for all of them
    known = {("female_of", "king"): "queen", ("superlative_of", "bad"): "worst", ("adverb_of", "calm"): "calmly",
             ("opposite_of", "aware"): "unaware", ("participle_of", "code"): "coding",
             ("past_tense_of", "swimming"): "swam", ("third_person_of", "eat"): "eats"}
    for (name, key), answer in known.items():
        assert word_pairs(name, gensim_words)[key] == answer
    # lexicon is trained on every question it has (none of its tasks is evaluated), each once
    empty = {n: dataclasses.replace(load_task(n, 1000, seed=0), items=[]) for n in lex}
    pairs = instruction_pairs(lex, 250, seed=0, held_out=empty)
    users = [p["messages"][1]["content"] for p in pairs]
    assert len(users) == len(set(users)) > 250
    assert all(p["messages"][1]["content"].startswith("Answer the question with one word.\n") for p in pairs)
    # and no geography question, test, validation or demonstration, is asked or answered in them
    for name in geo:
        task, val = load_task(name, 1000, seed=0), load_task(name, 1000, seed=0, split="validation")
        for it in task.items + task.pool + val.items:
            q = conversation(task, it)[1]["content"].split("\n", 1)[1]
            assert not any(q in u for u in users)
    answers = {p["messages"][2]["content"] for p in pairs}
    assert not answers & {v for n in geo for v in word_pairs(n, gensim_words).values()}
