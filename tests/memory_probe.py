"""Peak memory of a CPU training step, run in a fresh process by tests/test_sizing.py (RSS is per process).

Prints {"measured": peak anonymous RSS minus the same before the model is built, "estimate": sizing's
figure}. Anonymous memory (RssAnon, polled every millisecond) leaves out the shared libraries' pages,
which the kernel may drop and fault back in at any time; the runtime is warmed first on a tiny model
(lazily loaded kernels and thread pools are not the model's).
"""

import json
import sys
import threading
import time

import torch

from lmlab.models.registry import build
from lmlab.models.sizing import size
from lmlab.models.transformer.gpt import GPTConfig
from lmlab.models.transformer.mixtral import MixtralConfig


def rss_anon() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon")


class Peak(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = rss_anon(), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.001)


def step(model, x, opt) -> None:
    out = model(x, x)
    (out.loss + (out.aux_loss if out.aux_loss is not None else 0)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main(kind: str, batch: int, T: int = 256) -> None:
    torch.set_num_threads(1)
    moe = dict(n_kv_head=2, n_expert=8)
    for tiny in (GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, block_size=16),
                 MixtralConfig(n_layer=1, n_head=2, n_embd=32, mlp_hidden=32, vocab_size=64, block_size=16, **moe)):
        m = build(tiny)
        step(m, torch.randint(0, 64, (2, 16)), torch.optim.AdamW(m.parameters()))
        del m
    cfg = (GPTConfig(n_layer=6, n_head=6, n_embd=384, vocab_size=4096, block_size=T) if kind == "gpt" else
           MixtralConfig(n_layer=4, n_head=4, n_embd=256, mlp_hidden=512, vocab_size=4096, block_size=T, **moe))
    x = torch.randint(0, 4096, (batch, T))
    base = rss_anon()
    poll = Peak()
    poll.start()
    model = build(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        step(model, x, opt)
    poll.running = False
    poll.join()
    peak = max(poll.peak, rss_anon()) - base
    print(json.dumps({"measured": peak, "estimate": size(cfg, context=T, batch=batch, act_bytes=4).train_bytes()}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
