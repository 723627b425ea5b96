"""lmlab models inside EleutherAI's lm-evaluation-harness (`pip install lm-eval`).

`LmlabEvalLM` is an `lm_eval.api.model.LM` that forwards the harness's requests to an lmlab `LM`
(lmlab/eval/harness/lm.py), so both harnesses score the same strings with the same code:

    from lmlab.eval.harness.lm_eval_adapter import LmlabEvalLM, register
    lm_eval.simple_evaluate(model=LmlabEvalLM(lm), tasks=[...])                # an instance
    register(); lm_eval.simple_evaluate(model="lmlab", model_args={"pretrained": "runs/<run>"}, ...)

`register()` adds the name "lmlab" to lm-eval's model registry in this process. lm-eval 0.4.x finds
models only through that registry (it scans no package entry points), so there is no plugin entry
point to declare; `python -m lmlab.eval.harness.lm_eval_adapter ...` runs lm-eval's CLI with it registered.
"""

from __future__ import annotations

import sys

from lm_eval.api.model import LM as HarnessLM

from lmlab.eval.harness.lm import LM, GenArgs, load_lm

NAME = "lmlab"


class LmlabEvalLM(HarnessLM):
    """Wraps an lmlab `LM`, or loads one from `pretrained` (any path `load_lm` accepts)."""

    def __init__(self, lm: LM | None = None, pretrained: str | None = None, batch_size: int | str = 16,
                 dtype: str | None = None, device: str | None = None, **_ignored):
        super().__init__()
        if lm is None:
            if pretrained is None:
                raise ValueError("give an lmlab LM or pretrained=<path of a checkpoint, .gguf or .arpa>")
            import torch

            bs = 16 if str(batch_size).startswith("auto") else int(batch_size)
            lm = load_lm(pretrained, batch_size=bs, dtype=getattr(torch, dtype) if dtype else None,
                         device=device or "cpu")
        self.lm = lm

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.lm.loglikelihood([tuple(r.args) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self.lm.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        calls = []
        for r in requests:
            context, kw = r.args[0], dict(r.args[1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            # greedy decoding only: lmlab's harness compares exact answers
            calls.append((context, GenArgs(until=tuple(until), max_new_tokens=int(kw.get("max_gen_toks", 256)))))
        return self.lm.generate_until(calls)


def register() -> None:
    """Make `model="lmlab"` (with model_args pretrained=PATH) known to lm-eval in this process."""
    import lm_eval.models  # noqa: F401  (lm-eval's own models first: it loads them only into an empty registry)
    from lm_eval.api.registry import model_registry, register_model

    if model_registry.get(NAME, default=None) is not LmlabEvalLM:
        register_model(NAME)(LmlabEvalLM)


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with the lmlab model registered: `--model lmlab --model_args pretrained=P`."""
    register()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
