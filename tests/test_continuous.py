"""Continuous batching (lmlab/generate/continuous.py): sequences that join and leave a running batch
decode exactly what they decode alone."""

import torch

from lmlab.generate.continuous import Slot, SlotDecoder
from lmlab.generate.engine import SamplingConfig, generate_ids
from lmlab.models.transformer.gpt import GPT, GPTConfig


def _model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50)).eval()


def test_joining_and_leaving_rows_decode_as_alone():
    model = _model()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15], [3, 3]]
    cfgs = [SamplingConfig(max_new_tokens=n, temperature=t, seed=s)
            for n, t, s in [(9, 0, None), (4, 0, None), (12, 1.0, 5), (7, 0.7, 1), (10, 0, None)]]
    alone = [list(generate_ids(model, p, c)) for p, c in zip(prompts, cfgs)]
    dec = SlotDecoder(model, max_batch=3, max_len=40, eos_id=None)
    got: dict[int, list[int]] = {}
    waiting = list(range(len(prompts)))
    slots: dict[Slot, int] = {}
    while waiting or dec.slots:
        while waiting and dec.free:  # join on arrival
            i = waiting.pop(0)
            s = Slot(list(prompts[i]), cfgs[i])
            slots[s] = i
            got[i] = [dec.add(s)[1].token]
        for s in [s for s in dec.slots if dec.finished(s)]:
            dec.remove(s)
        for s, info in dec.step():
            got[slots[s]].append(info.token)
    assert [got[i] for i in range(len(prompts))] == alone


def test_prompt_logprobs_equal_a_full_forward():
    model = _model()
    prompt = [5, 9, 2, 7, 1]
    dec = SlotDecoder(model, max_batch=2, max_len=32, eos_id=None)
    scored, first = dec.add(Slot(prompt, SamplingConfig(max_new_tokens=1, temperature=0), logprobs=2,
                                 prompt_logprobs=True))
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt])).logits[0], -1)
    assert scored[0] is None and len(scored) == len(prompt)
    for t in range(1, len(prompt)):
        assert abs(scored[t].logprob - float(lp[t - 1, prompt[t]])) < 1e-5
        assert scored[t].top[0][0] == int(lp[t - 1].argmax())
    assert first.token == int(lp[-1].argmax()) and len(first.top) == 2
