"""Few-shot evaluation made fast and resumable: restricted logits, shared contexts, the cell cache."""

import json

import pytest
import torch

# the tiny models, the character tokenizer and the one-thread fixture of the harness tests
from test_fewshot import TOK, _model, one_thread  # noqa: E402,F401

import lmlab.eval.harness.fewshot as fewshot
import lmlab.eval.harness.lm as lm_module
from lmlab.eval.harness.fewshot import run_fewshot
from lmlab.eval.harness.lm import GenArgs, TorchLM


def _choice_requests():
    """Multiple-choice style: each context (of varied length) with choices of 1 to 6 characters,
    and one context that occurs with a single continuation."""
    out = []
    for i in range(9):
        ctx = "The capital of " + "xyz"[i % 3] * (1 + 3 * i) + " is"
        out += [(ctx, " " + c) for c in ("A", "Rome", "Lisbon", "Oslo")]
    # at the block size of 128: a long context and a long continuation cannot share one batch
    return out + [("lonely context", " z"), ("x" * 120, " ab"), ("short", " " + "y" * 100)]


def _plain(lm: TorchLM) -> TorchLM:
    """The same model scored the slow way: every request on its own row, logits at every position."""
    slow = TorchLM(lm.model, TOK, prefix=lm.prefix, batch_size=lm.batch_size)
    slow.cached, slow.trims_logits = False, False
    return slow


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_restricted_logits_and_shared_contexts_give_the_same_loglikelihoods(family):
    lm = TorchLM(_model(family), TOK, prefix=[TOK.eos_id], batch_size=16)
    assert lm.cached and lm.trims_logits
    reqs = _choice_requests()
    want = _plain(lm).loglikelihood(reqs)
    fast = lm.loglikelihood(reqs)
    no_cache = TorchLM(lm.model, TOK, prefix=lm.prefix, batch_size=5)
    no_cache.cached = False  # score_tokens with the output layer restricted to the scored positions
    for got in (fast, no_cache.loglikelihood(reqs)):
        torch.testing.assert_close(torch.tensor([s for s, _ in got]), torch.tensor([s for s, _ in want]),
                                   rtol=1e-4, atol=1e-4)
        assert [g for _, g in got] == [g for _, g in want]
    assert lm.loglikelihood([("abc", "")]) == [(0.0, True)]


def test_each_context_runs_once_and_the_output_layer_only_where_scored():
    lm = TorchLM(_model("llama"), TOK, prefix=[TOK.eos_id], batch_size=16)
    calls = []
    head = lm.model.lm_head.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    embed = lm.model.wte.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    try:
        reqs = _choice_requests()[:-2]
        lm.loglikelihood(reqs)
        lm.generate_until([("Q: 1 plus 1?\nA:", GenArgs(until=("\n",), max_new_tokens=3))])
    finally:
        head.remove()
        embed.remove()
    contexts = {c for c, _ in reqs}
    longest = max(len(lm.encode_pair(c, "")[0]) for c in contexts)
    # scoring: the 10 distinct contexts (padded to the longest), one output position each; then the
    # 37 continuations (5 characters at most after the first); generation's prefill keeps one position
    assert calls[:4] == [(len(contexts), longest), (len(contexts), 1, 32), (len(reqs), 6), (len(reqs), 6, 32)]
    assert calls[5] == (1, 1, 32)


def _tiny_lm(path, **kw):
    return TorchLM(_model("llama"), TOK, prefix=[TOK.eos_id], batch_size=8, name="tiny")


def test_interrupted_run_continues_and_a_finished_run_does_no_model_calls(tmp_path, monkeypatch):
    monkeypatch.setattr(lm_module, "load_lm", _tiny_lm)
    tasks, shots = ["arithmetic_2d+", "days", "counting"], [0, 1]
    full = run_fewshot(["m"], tasks, shots, items=3, out=tmp_path / "full")

    real, done = fewshot.evaluate_task, []

    def dies_at_the_third_cell(lm, task, k, seed=0):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append((task.name, k))
        return real(lm, task, k, seed)

    out = tmp_path / "resumed"
    monkeypatch.setattr(fewshot, "evaluate_task", dies_at_the_third_cell)
    with pytest.raises(KeyboardInterrupt):
        run_fewshot(["m"], tasks, shots, items=3, out=out)
    assert len(list((out / "cells").glob("*.json"))) == 2 and not (out / "results.json").exists()

    ran = []
    monkeypatch.setattr(fewshot, "evaluate_task", lambda lm, task, k, seed=0: ran.append((task.name, k))
                        or real(lm, task, k, seed))
    resumed = run_fewshot(["m"], tasks, shots, items=3, out=out)
    assert ran == [(t, k) for t in tasks for k in shots][2:]  # only the cells that were not done
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(full)

    def no_model(*a, **kw):
        raise AssertionError("a finished run loaded the model")

    monkeypatch.setattr(lm_module, "load_lm", no_model)
    again = run_fewshot(["m"], tasks, shots, items=3, out=out)
    assert again == resumed
    results = json.loads((out / "results.json").read_text())["results"]
    assert strip(results) == strip(full) and len(results) == len(tasks) * len(shots)
    # other settings are other cells: more items are computed again, not taken from the cache
    monkeypatch.setattr(lm_module, "load_lm", _tiny_lm)
    ran.clear()
    run_fewshot(["m"], tasks[:1], shots[:1], items=4, out=out)
    assert ran == [(tasks[0], 0)]


def test_finished_rows_leave_the_decode_batch_without_changing_outputs():
    model = _model("llama")
    torch.manual_seed(1)
    with torch.no_grad():  # large random weights: outputs that differ between prompts (a tiny model at
        for p in model.parameters():  # its usual init repeats one character whatever the prompt)
            p.normal_(0, 0.5)
    lm = TorchLM(model, TOK, prefix=[TOK.eos_id], batch_size=8)
    prompts = ["Q: what is " + "abcdefgh"[: i % 8 + 1] + "?\nA:" for i in range(8)]
    args = GenArgs(until=("e",), max_new_tokens=12)
    batches = []
    hook = lm.model.wte.register_forward_hook(lambda m, a, o: batches.append(a[0].shape[0]))
    try:
        together = lm.generate_until([(p, args) for p in prompts])
    finally:
        hook.remove()
    alone = TorchLM(model, TOK, prefix=[TOK.eos_id], batch_size=1).generate_until([(p, args) for p in prompts])
    assert together == alone and len(set(together)) > 4
    # the rows stopped at different steps, and the decode batch shrank as they did
    assert batches[0] == 8 and batches[-1] < 8 and batches == sorted(batches, reverse=True)


def test_a_changed_task_is_not_taken_from_the_cache(tmp_path):
    from lmlab.eval.tasks import Item, Task

    def task(target: str) -> Task:  # e.g. a user's JSONL file, edited between two runs
        return Task(name="qa", kind="generation", items=[Item("Q: x?\nA:", target)], pool=[Item("Q: y?\nA:", "y")])

    loads = []

    def load():
        loads.append(1)
        return _tiny_lm(None)

    cache = fewshot.CellCache(tmp_path, {"seed": 0})
    for t in (task("x"), task("x"), task("z")):
        fewshot.evaluate_model(load, "tiny", "m", [t], [1], cache=cache)
    assert len(loads) == 2 and len(list(tmp_path.glob("*.json"))) == 2
