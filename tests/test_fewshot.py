"""In-context evaluation: batched scoring, generation, task generators, prompts, task files, CLI."""

import json
import math
import re
import string

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peers import require_module

from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.eval.harness.fewshot import build_prompt, demonstrations, evaluate_task, stderr
from lmlab.eval.harness.lm import GenArgs, TorchLM
from lmlab.eval.harness.ngram_lm import NGramLM
from lmlab.eval.tasks import GROUPS, Item, expand, load_task
from lmlab.eval.tasks.jsonl import load_jsonl_task
from lmlab.eval.tasks.scramble import anagram1, anagram2, cycle_letters, random_insertion, reversed_word
from lmlab.generate.engine import SamplingConfig, generate_text
from lmlab.io.arpa import write_arpa
from lmlab.models.ngram.model import NGramConfig, NGramModel
from lmlab.models.nplm import NPLM, NPLMConfig
from lmlab.models.transformer.gpt import GPT, GPTConfig
from lmlab.models.transformer.llama import Llama, LlamaConfig
from lmlab.tokenizers import train_tokenizer

TOK = train_tokenizer("char", [string.printable])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is ~100x faster than two on a shared, loaded CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(family: str):
    torch.manual_seed(0)
    V = TOK.vocab_size
    if family == "gpt":
        return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=128, vocab_size=V))
    if family == "llama":  # the family GGUF files import into (RoPE, GQA)
        return Llama(LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, mlp_hidden=64, block_size=128,
                                 vocab_size=V))
    return NPLM(NPLMConfig(context=3, n_embd=16, hidden=32, block_size=128, vocab_size=V, pad_id=TOK.eos_id))


def _requests(n=40, seed=0):
    rng = np.random.default_rng(seed)
    letters = list(string.ascii_letters + " ,.")
    out = []
    for _ in range(n):
        ctx = "".join(rng.choice(letters, rng.integers(1, 60)))
        cont = " " + "".join(rng.choice(letters, rng.integers(1, 8)))
        out.append((ctx, cont))
    return out


@pytest.mark.parametrize("family", ["gpt", "llama", "nplm"])
def test_loglikelihood_same_for_batch_sizes_1_7_32(family):
    lm = TorchLM(_model(family), TOK, prefix=[TOK.eos_id])
    reqs = _requests()
    results = {}
    for bs in (1, 7, 32):
        lm.batch_size = bs
        results[bs] = lm.loglikelihood(reqs)
    for bs in (7, 32):
        a = np.array([s for s, _ in results[1]])
        b = np.array([s for s, _ in results[bs]])
        np.testing.assert_allclose(b, a, rtol=1e-4)
        assert [g for _, g in results[1]] == [g for _, g in results[bs]]


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_loglikelihood_equals_direct_computation(family):
    model = _model(family)
    lm = TorchLM(model, TOK, prefix=[TOK.eos_id], batch_size=8)
    reqs = _requests(12, seed=1) + [("Q: What is 2 plus 2?\n\nA:", " 4"), ("Answer: ", "yes")]
    for (ctx, cont), (ll, greedy) in zip(reqs, lm.loglikelihood(reqs)):
        n_ws = len(ctx) - len(ctx.rstrip())        # trailing spaces of the context belong to the continuation
        ctx, cont = (ctx[:-n_ws], ctx[-n_ws:] + cont) if n_ws else (ctx, cont)
        ids = [TOK.eos_id] + TOK.encode(ctx + cont)
        n = len(TOK.encode(cont))
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), -1)
        target = torch.tensor(ids[1:])
        per_token = logp[torch.arange(len(target)), target][-n:]
        assert ll == pytest.approx(float(per_token.sum()), rel=1e-4)
        assert greedy == bool((logp.argmax(-1)[-n:] == target[-n:]).all())


def test_greedy_continuation_scores_as_greedy():
    lm = TorchLM(_model("gpt"), TOK, prefix=[TOK.eos_id])
    ctx = "The cat sat on the"
    out = lm.generate_until([(ctx, GenArgs(until=(), max_new_tokens=4))])[0]
    assert lm.loglikelihood([(ctx, out)])[0][1] is True
    assert lm.loglikelihood([(ctx, out[:-1] + ("a" if out[-1] != "a" else "b"))])[0][1] is False


@pytest.mark.parametrize("family", ["gpt", "llama", "nplm"])
def test_generate_until_batched_equals_engine(family):
    model = _model(family)
    lm = TorchLM(model, TOK, batch_size=16)
    prompts = [ctx for ctx, _ in _requests(9, seed=2)]
    args = GenArgs(until=("e",), max_new_tokens=6)
    batched = lm.generate_until([(p, args) for p in prompts])
    for p, got in zip(prompts, batched):
        ref = generate_text(model, TOK, p, SamplingConfig(temperature=0, max_new_tokens=6, stop=["e"]))
        assert got == ref
        assert "e" not in got


def test_loglikelihood_rolling_sums_every_token():
    model = _model("gpt")
    lm = TorchLM(model, TOK, prefix=[TOK.eos_id])
    text = "hello world, " * 3
    ids = [TOK.eos_id] + TOK.encode(text)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), -1)
    assert lm.loglikelihood_rolling([text])[0] == pytest.approx(float(logp[torch.arange(len(ids) - 1), ids[1:]].sum()),
                                                                 rel=1e-5)


# ------------------------------------------------------------------------------------------- n-gram

def test_ngram_adapter_scores_the_continuation_and_its_line_end(docs_lines):
    model = NGramModel.from_text(docs_lines[:500], NGramConfig(order=3))
    lm = NGramLM(model)
    [(ll, greedy)] = lm.loglikelihood([("first line\nthe value of", " the")])
    per_word = [p for p, _, _ in model.full_scores("the value of the")]   # the, value, of, the, </s>
    assert ll == pytest.approx(math.log(10) * (per_word[-2] + per_word[-1]))
    out = lm.generate_until([("the value of", GenArgs(until=("\n",), max_new_tokens=5))])[0]
    assert out.startswith(" ") and "\n" not in out
    # greedy words score as greedy, and so does the closing </s> exactly when it is the likeliest next
    ends = int(np.argmax(model.next_logprobs([1, *model.encode("the value of" + out)]))) == 2  # <s>=1, </s>=2
    assert lm.loglikelihood([("the value of", out)])[0][1] == ends
    assert lm.loglikelihood([("the value of", " of")])[0][1] is False


# ------------------------------------------------------------------------------------------- tasks

WORDS_FILE = """\
: capital-common-countries
Athens Greece Berlin Germany
Berlin Germany Cairo Egypt
Cairo Egypt Dublin Ireland
Dublin Ireland Madrid Spain
Madrid Spain Oslo Norway
Oslo Norway Paris France
Paris France Rome Italy
Rome Italy Tokyo Japan
Tokyo Japan Vienna Austria
Vienna Austria Warsaw Poland
Warsaw Poland Lisbon Portugal
Lisbon Portugal Athens Greece
Bern Switzerland Hanoi Vietnam
: capital-world
Accra Ghana Ankara Turkey
Baku Azerbaijan Bamako Mali
Canberra Australia Caracas Venezuela
Dhaka Bangladesh Havana Cuba
Kabul Afghanistan Lima Peru
Nairobi Kenya Ottawa Canada
: family
boy girl brother sister
brother sister father mother
father mother king queen
king queen nephew niece
nephew niece uncle aunt
uncle aunt husband wife
: gram3-comparative
bad worse big bigger
big bigger bright brighter
bright brighter cheap cheaper
cheap cheaper cold colder
cold colder easy easier
easy easier fast faster
fast faster good better
good better great greater
great greater hard harder
hard harder large larger
large larger long longer
long longer loud louder
"""


@pytest.fixture()
def words_file(tmp_path):
    path = tmp_path / "questions-words.txt"
    path.write_text(WORDS_FILE)
    return str(path)


def test_arithmetic_published_format():
    task = load_task("arithmetic_2d+", 50, seed=0)
    assert task.kind == "generation" and task.stop == ("\n",)
    for it in task.items + task.pool:
        a, b = map(int, re.fullmatch(r"Q: What is (\d+) plus (\d+)\?\n\nA:", it.context).groups())
        assert 0 <= a < 100 and 0 <= b < 100 and it.target == str(a + b)
    minus = load_task("arithmetic_3d-", 200, seed=0).items
    assert any(it.target.startswith("-") for it in minus)
    for it in minus:
        a, b = map(int, re.fullmatch(r"Q: What is (\d+) minus (\d+)\?\n\nA:", it.context).groups())
        assert int(it.target) == a - b
    for it in load_task("arithmetic_2dx", 20, seed=0).items:
        a, b = map(int, re.fullmatch(r"Q: What is (\d+) times (\d+)\?\n\nA:", it.context).groups())
        assert int(it.target) == a * b
    for it in load_task("arithmetic_1dc", 20, seed=0).items:
        expr = re.fullmatch(r"Q: What is (.+)\?\n\nA:", it.context).group(1)
        assert re.fullmatch(r"\(\d [-+*] \d\) [-+*] \d|\d [-+*] \(\d [-+*] \d\)", expr)
        assert int(it.target) == eval(expr)
    five = load_task("arithmetic_5d+", 5, seed=0).items
    assert all(max(map(int, re.findall(r"\d+", it.context))) < 100000 for it in five)
    # GPT-3's exact prompt shape, as a 1-shot prompt
    demo, item = Item(context="Q: What is 98 plus 45?\n\nA:", target="143"), task.items[0]
    prompt = build_prompt(task, item, [demo])
    assert prompt == "Q: What is 98 plus 45?\n\nA: 143\n\n" + item.context


def test_generators_are_seeded_and_reproducible(words_file):
    for name in expand(list(GROUPS)):
        a = load_task(name, 6, seed=1, words_file=words_file)
        b = load_task(name, 6, seed=1, words_file=words_file)
        assert a.items == b.items and a.pool == b.pool, name
        more = load_task(name, 9, seed=1, words_file=words_file)
        assert more.items[:len(a.items)] == a.items, name  # asking for more keeps the first ones
    x = load_task("arithmetic_2d+", 10, seed=1).items
    assert x != load_task("arithmetic_2d+", 10, seed=2).items
    minus = load_task("arithmetic_2d-", 10, seed=1).items
    assert [i.context for i in x] != [i.context.replace("plus", "minus") for i in minus]
    # pinned: the generators' output must not drift between versions
    assert load_task("arithmetic_2d+", 1, seed=0).items[0].context == "Q: What is 12 plus 93?\n\nA:"


def test_scrambling_transformations():
    rng = __import__("random").Random(0)
    assert reversed_word("objects", rng) == "stcejbo"
    for word in ("inevitably", "corruption", "opponent", "succession"):
        c = cycle_letters(word, rng)
        assert c != word and c in word + word and len(c) == len(word)
        a1 = anagram1(word, rng)
        assert a1[0] == word[0] and a1[-1] == word[-1] and sorted(a1) == sorted(word) and a1 != word
        a2 = anagram2(word, rng)
        assert a2[:2] == word[:2] and a2[-2:] == word[-2:] and sorted(a2) == sorted(word) and a2 != word
        ri = random_insertion(word, rng)
        assert ri[::2] == word and len(ri) == 2 * len(word) - 1
        assert all(ch in string.punctuation + " " for ch in ri[1::2])


def test_word_tasks_formats(words_file):
    task = load_task("cycle_letters", 5, seed=0, words_file=words_file)
    assert task.description == "Please unscramble the letters into a word, and write that word:\n"
    assert all(it.context.endswith(" =") for it in task.items)
    analogy = load_task("analogy", 8, seed=0, words_file=words_file)
    for it in analogy.items:
        assert re.fullmatch(r"\w+ is to \w+ as \w+ is to", it.context) and len(it.choices) == 4
        assert len(set(it.choices)) == 4
    capitals = load_task("capitals", 8, seed=0, words_file=words_file)
    item = next(it for it in capitals.items if it.context == "The capital of Greece is") \
        if any(it.context == "The capital of Greece is" for it in capitals.items) else None
    assert item is None or item.answer == "Athens"
    days = load_task("days", 10, seed=0)
    for it in days.items:
        assert it.context.endswith(",") and it.target in ("Monday", "Tuesday", "Wednesday", "Thursday",
                                                           "Friday", "Saturday", "Sunday")


@pytest.mark.parametrize("shots", [1, 5])
def test_demonstrations_come_from_the_pool_never_the_test_item(words_file, shots):
    for name in expand(list(GROUPS)):
        task = load_task(name, 12, seed=0, words_file=words_file)
        pool_contexts = {d.context for d in task.pool}
        if name not in ("capitals",):  # capitals cycles test countries, never pool ones
            assert not pool_contexts & {it.context for it in task.items}, name
        for i, item in enumerate(task.items):
            demos = demonstrations(task, i, shots, seed=0)
            assert len(demos) == shots and all(d in task.pool for d in demos)
            assert item.context not in {d.context for d in demos}
            prompt = build_prompt(task, item, demos)
            shown = [d.context + task.target_delimiter + d.answer for d in demos]
            assert prompt == task.description + task.separator.join(shown + [item.context])
            assert item.context + task.target_delimiter + item.answer not in shown
            assert demonstrations(task, i, shots, seed=0) == demos          # seeded
    with pytest.raises(LmlabError, match="pool"):
        demonstrations(load_task("days", 3, seed=0), 0, 100, seed=0)


def test_accuracy_and_standard_error():
    assert stderr(0.25, 100) == pytest.approx(math.sqrt(0.25 * 0.75 / 100))
    task = load_task("counting", 8, seed=0)

    class Oracle(TorchLM):  # answers every item right: exact match after the stop string
        def __init__(self):
            self.name = "oracle"

        def generate_until(self, requests):
            return [f" {int(ctx.rsplit(',', 2)[-2].split()[-1]) + 1},\nmore" for ctx, _ in requests]

    r = evaluate_task(Oracle(), task, 1, seed=0)
    assert r.acc == 1.0 and r.acc_stderr == 0.0 and r.n == 8


# ------------------------------------------------------------------------------------------- task files

def _write(tmp_path, lines):
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_task_file_errors_name_the_line(tmp_path):
    ok = json.dumps({"context": "a", "choices": ["x", "y"], "gold": 1})
    cases = {
        "missing field 'gold'": [ok, json.dumps({"context": "b", "choices": ["x", "y"]})],
        "gold index 2 out of range for 2 choices": [ok, ok,
                                                    json.dumps({"context": "b", "choices": ["x", "y"], "gold": 2})],
        "missing field 'context'": [json.dumps({"choices": ["x", "y"], "gold": 0})],
        "not valid JSON": [ok, "{oops"],
        "missing field 'target'": [json.dumps({"context": "b"})],
    }
    for message, lines in cases.items():
        with pytest.raises(LmlabError) as e:
            load_jsonl_task(_write(tmp_path, lines))
        assert message in str(e.value) and f"line {len(lines)}" in str(e.value), str(e.value)


def test_task_file_settings_and_pool(tmp_path):
    lines = [json.dumps({"task": {"name": "qa", "separator": "\n", "stop": ["."]}})]
    lines += [json.dumps({"context": f"Q{i}:", "target": str(i), "split": "train" if i < 3 else "test"})
              for i in range(8)]
    task = load_jsonl_task(_write(tmp_path, lines))
    assert task.name == "qa" and task.kind == "generation" and task.stop == (".",)
    assert [d.context for d in task.pool] == ["Q0:", "Q1:", "Q2:"] and len(task.items) == 5
    prompt = build_prompt(task, task.items[0], task.pool[:2])
    assert prompt == "Q0: 0\nQ1: 1\nQ3:"


# ------------------------------------------------------------------------------------------- CLI

@pytest.mark.filterwarnings("ignore:no .-grams with adjusted count")  # a toy corpus: fallback discounts
def test_cli_fewshot_smoke(char_data, tmp_path, capsys, words_file):
    run = tmp_path / "run"
    assert main(["train", "--data", str(char_data), "--out", str(run), "--model.n_layer=1", "--model.n_head=2",
                 "--model.n_embd=32", "--model.block_size=256", "--train.max_steps=2", "--train.batch_size=2",
                 "--train.progress=false", "--train.eval_iters=1"]) == 0
    arpa = tmp_path / "days.arpa"
    days = "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday,".split()
    write_arpa(NGramModel.from_text([" ".join(days[i:] + days[:i]) for i in range(7)],
                                    NGramConfig(order=3, discount_fallback=True)), arpa)
    out = tmp_path / "fs"
    assert main(["fewshot", "--model", str(run), "--model", str(arpa), "--name", "tiny", "--tasks",
                 "arithmetic_2d+,days,analogy", "--shots", "0,1", "--items", "4", "--out", str(out),
                 "--words_file", words_file]) == 0
    res = json.loads((out / "results.json").read_text())
    assert {(r["model"], r["task"], r["shots"]) for r in res["results"]} == {
        (m, t, k) for m in ("tiny", "days.arpa") for t in ("arithmetic_2d+", "days", "analogy") for k in (0, 1)}
    assert all(r["n"] == 4 and 0 <= r["acc"] <= 1 for r in res["results"])
    # the n-gram saw every day follow its predecessor: it continues each days item right, at any k
    assert [r["acc"] for r in res["results"] if r["model"] == "days.arpa" and r["task"] == "days"] == [1.0, 1.0]
    md = (out / "results.md").read_text()
    assert "## analogy" in md and "| tiny |" in md and "| days.arpa |" in md
    require_module("matplotlib")
    assert (out / "accuracy_vs_shots.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["fewshot", "--model", str(run), "--tasks", "nosuchtask", "--out", str(out)]) == 2
    assert "unknown task 'nosuchtask'" in capsys.readouterr().err


def test_wilson_interval_is_not_degenerate_and_cache_keys_weights_and_code(tmp_path):
    from lmlab.eval.harness.fewshot import CellCache, code_version, weights_digest, wilson

    lo, hi = wilson(0.0, 200)
    assert lo == 0.0 and hi == pytest.approx(0.0188, abs=1e-4)  # 0 of 200: [0, 1.9%], not "0.0 ± 0.0"
    lo, hi = wilson(0.5, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)  # Brown, Cai & DasGupta 2001
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"a")
    before = weights_digest(model)
    assert before and code_version().startswith("0.")
    cache = CellCache(tmp_path / "cells", {"seed": 0})
    task = load_task("arithmetic_2d+", 5, seed=0)
    cache.put("m", str(model), task, 0, {"acc": 1.0}, [])
    assert cache.get("m", str(model), task, 0)["row"] == {"acc": 1.0}
    ident = cache.get("m", str(model), task, 0)["ident"]
    assert ident["weights"] == before and ident["code"] == code_version()
    (model / "model.safetensors").write_bytes(b"b")  # retrained weights under the same path
    assert weights_digest(model) != before
    assert CellCache(tmp_path / "cells", {"seed": 0}).get("m", str(model), task, 0) is None  # not reused


def test_mcnemar_p_is_the_exact_binomial_test_on_discordant_items():
    from scipy.stats import binomtest

    from lmlab.eval.harness.fewshot import mcnemar_p

    a = [1] * 30 + [0] * 12 + [1] * 5 + [0] * 53  # 12 items only b gets right, 5 only a
    b = [1] * 30 + [1] * 12 + [0] * 5 + [0] * 53
    assert mcnemar_p(a, b) == pytest.approx(binomtest(5, 17, 0.5).pvalue, rel=1e-12)
    assert mcnemar_p(a, b) == mcnemar_p(b, a)
    assert mcnemar_p(a, a) == 1.0  # no discordant item: no evidence either way
    with pytest.raises(ValueError, match="not paired"):
        mcnemar_p(a, b[:-1])
