"""lmlab models inside lm-evaluation-harness: same per-item log-likelihoods and accuracy as lmlab's harness.

A local lm-eval task (YAML + JSONL in tmp_path, no download) holds exactly the prompts lmlab's
harness built (0-shot, and 2-shot with the demonstrations written into the context), so both score
the same strings; lm-eval then runs at num_fewshot=0.
"""

import json
import string

import pytest
import torch
from lm_eval_tasks import harness_task
from peers import require_module

lm_eval = require_module("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

from lmlab.cli import main  # noqa: E402
from lmlab.eval.harness.fewshot import evaluate_task  # noqa: E402
from lmlab.eval.harness.lm import TorchLM, load_lm  # noqa: E402
from lmlab.eval.harness.lm_eval_adapter import LmlabEvalLM, register  # noqa: E402
from lmlab.eval.tasks.jsonl import load_jsonl_task  # noqa: E402
from lmlab.models.transformer.gpt import GPT, GPTConfig  # noqa: E402
from lmlab.tokenizers import train_tokenizer  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run far faster on one thread of a shared CPU
    yield
    torch.set_num_threads(n)


COLORS = ["red", "green", "blue", "yellow", "black", "white"]


def _our_task(tmp_path):
    """A multiple-choice JSONL task: 'apple is' -> one of four colours; 4 demo items, 9 test items."""
    rows = []
    for i, word in enumerate(["apple", "sky", "grass", "snow", "coal", "sun", "lemon", "cherry", "night",
                              "milk", "leaf", "ocean", "banana"]):
        choices = [COLORS[(i + j) % len(COLORS)] for j in range(4)]
        rows.append({"context": f"The colour of {word} is", "choices": choices, "gold": i % 4,
                     "split": "train" if i < 4 else "test"})
    path = tmp_path / "colours.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return load_jsonl_task(path)


def _run(model, model_args, tmp_path, name, ours):
    manager = harness_task(tmp_path, name, ours.items)
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[name], num_fewshot=0,
                                  task_manager=manager, log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    mine = [it["loglikelihoods"] for it in ours.items]
    assert len(theirs) == len(mine) == ours.n
    for a, b in zip(theirs, mine):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
    metrics = out["results"][name]
    assert metrics["acc,none"] == pytest.approx(ours.acc)
    assert metrics["acc_norm,none"] == pytest.approx(ours.acc_norm)


@pytest.fixture(scope="module")
def tiny_lm():
    tok = train_tokenizer("char", [string.printable])
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=256, vocab_size=tok.vocab_size))
    return TorchLM(model, tok, prefix=[tok.eos_id], batch_size=5)


@pytest.mark.parametrize("shots", [0, 2])
def test_instance_matches_our_harness(tiny_lm, tmp_path, shots):
    ours = evaluate_task(tiny_lm, _our_task(tmp_path), shots, seed=3)
    if shots:
        assert ours.items[0]["prompt"].count("The colour of") == shots + 1
    _run(LmlabEvalLM(tiny_lm), None, tmp_path, f"lmlab_colours_{shots}", ours)


def test_registered_name_loads_a_checkpoint(char_data, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data", str(char_data), "--out", str(run), "--model.n_layer=1", "--model.n_head=2",
                 "--model.n_embd=32", "--model.block_size=128", "--train.max_steps=2", "--train.batch_size=2",
                 "--train.progress=false", "--train.eval_iters=1"]) == 0
    register()
    ours = evaluate_task(load_lm(run), _our_task(tmp_path), 1, seed=0)
    _run("lmlab", {"pretrained": str(run), "batch_size": 3}, tmp_path, "lmlab_colours_named", ours)


def test_generate_until_through_the_harness(tiny_lm, tmp_path):
    """lm-eval's generation requests (until, max_gen_toks) reach our greedy decoder unchanged."""
    rows = [{"context": f"Q: What is {i} plus {i}?\n\nA:", "target": str(2 * i)} for i in range(6)]
    data = tmp_path / "gen.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "gen.yaml").write_text(f"""
task: lmlab_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {tmp_path / "hf_cache"}
test_split: test
output_type: generate_until
doc_to_text: context
doc_to_target: target
generation_kwargs:
  until: ["a"]
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
""")
    tasks = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    out = lm_eval.simple_evaluate(model=LmlabEvalLM(tiny_lm), tasks=["lmlab_gen"], num_fewshot=0, log_samples=True,
                                  task_manager=tasks,
                                  bootstrap_iters=0)
    theirs = [s["resps"][0][0] for s in sorted(out["samples"]["lmlab_gen"], key=lambda s: s["doc_id"])]
    from lmlab.eval.harness.lm import GenArgs

    ours = tiny_lm.generate_until([(r["context"], GenArgs(until=("a",), max_new_tokens=5)) for r in rows])
    assert theirs == ours and any(ours)
