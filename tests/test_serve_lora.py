"""`lmlab serve MODEL --lora-modules NAME=PATH ...`: PEFT LoRA adapters served by model name beside their base,
through a real server process and the official `openai` client, on a tiny Llama run with two random adapters
(non-zero B, different ranks and target modules): each adapter's greedy output is the merged model's
offline greedy output, the base's is the base's, also with base and adapter requests sharing the batch;
adapters that do not fit the base are one clear error at startup."""

import asyncio
import copy
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from peers import require_module
from serve_server import KEY, ROOT, serve, train_tiny

from lmlab.errors import LmlabError
from lmlab.generate.engine import SamplingConfig, generate_ids, prompt_ids
from lmlab.io.load import load_model
from lmlab.io.peft import load_peft_adapter, lora_layout, save_peft_adapter
from lmlab.models.registry import build
from lmlab.nn.lora import LoRAConfig, apply_lora, merge_lora
from lmlab.serve.app import ServeConfig, create_app

openai = require_module("openai")
MARGIN = 1e-3  # the rule: outputs may part only where the offline top-2 logit margin is below it
# (rank, alpha, targets): different ranks and target sets, so the stacked factors are padded both ways
ADAPTERS = {"sql": (4, 8.0, ["q_proj", "v_proj"]), "poems": (2, 5.0, ["k_proj", "o_proj", "up_proj", "down_proj"])}
PROMPTS = ["The json module", "a file", "the value of", "returns an object with", "list"]


def _random_adapter(model, path, rank: int, alpha: float, targets: list[str], seed: int, base=None):
    """A PEFT adapter with random A and B (B starts at zero in training, which would hide a wrong B)."""
    model = copy.deepcopy(model)
    apply_lora(model, lora_layout(model)[0], LoRAConfig(rank=rank, alpha=alpha, targets=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return save_peft_adapter(model, path, base_model=base)


@pytest.fixture(scope="module")
def setup(bpe_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_lora")
    run = train_tiny(tmp / "run", bpe_data, "--model", "llama-tiny", "--model.n_embd=32",
                     "--model.n_kv_head=1", "--model.mlp_hidden=64", "--model.block_size=128",
                     "--train.max_steps=3")
    base = load_model(run)
    paths = {name: _random_adapter(base.model, tmp / name, *spec, seed=i, base=str(run))
             for i, (name, spec) in enumerate(ADAPTERS.items())}
    merged = {}
    for name, path in paths.items():  # the adapter merged into the base's weights (merge_lora)
        m = load_peft_adapter(copy.deepcopy(base.model), path)
        merged[name] = merge_lora(m).eval()
    return run, base, paths, merged


@pytest.fixture(scope="module")
def server(setup):
    run, _, paths, _ = setup
    with serve(run, "--max-batch", "4", "--lora-modules", *(f"{n}={p}" for n, p in paths.items())) as s:
        yield s


def _greedy(model, ids: list[int], n: int, eos: int) -> list[int]:
    """`lmlab generate`'s loop, greedy."""
    return list(generate_ids(model, ids, SamplingConfig(max_new_tokens=n, temperature=0), eos_id=eos))


def _agrees(model, ids: list[int], got: list[int], want: list[int]) -> bool:
    """got == want, or they part where the offline top-2 margin is below MARGIN (float rounding of an
    unmerged adapter, (W + BA)x vs Wx + B(Ax), may break a near tie)."""
    if got == want:
        return True
    j = next((t for t, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    with torch.no_grad():
        top2 = model(torch.tensor([ids + want[:j]])).logits[0, -1].topk(2).values
    return bool(top2[0] - top2[1] < MARGIN)


def _token_ids(choice) -> list[int]:
    return [int(t.split(":")[1]) for t in choice.logprobs.tokens]


def _jobs() -> list[tuple[str, str, int]]:
    """(model, prompt, max_tokens): every model on every prompt, mixed lengths."""
    names = ["run", *ADAPTERS]
    return [(names[i % 3], PROMPTS[i % len(PROMPTS)], 4 + (5 * i) % 13) for i in range(12)]


def test_models_lists_the_base_and_each_adapter(server):
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    cards = {m.id: m for m in client.models.list()}
    assert list(cards) == ["run", "sql", "poems"]
    assert cards["run"].parent is None
    assert cards["sql"].parent == "run" and cards["poems"].parent == "run"
    assert cards["sql"].root.endswith("sql")
    bad = server.post("/v1/completions", {"model": "nope", "prompt": "a", "max_tokens": 2})
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "model_not_found"
    assert "'sql'" in bad.json()["error"]["message"]


def test_each_model_name_equals_offline_generation_of_its_merged_model(server, setup):
    _, base, _, merged = setup
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    eos = base.tokenizer.eos_id
    outputs = {}
    for name in ["run", *ADAPTERS]:
        model = base.model if name == "run" else merged[name]
        for prompt in PROMPTS:
            ids = prompt_ids(base.tokenizer, prompt, base.bos)
            out = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0, logprobs=0,
                                            extra_body={"return_tokens_as_token_ids": True})
            assert out.model == name
            got = _token_ids(out.choices[0])
            want = _greedy(model, ids, 12, eos)
            assert got == want if name == "run" else _agrees(model, ids, got, want), (name, prompt)
            outputs[name, prompt] = got
    for name in ADAPTERS:  # the adapters change what is generated (else this test could not fail)
        assert any(outputs[name, p] != outputs["run", p] for p in PROMPTS), name
    # streamed: the same text
    stream = client.completions.create(model="poems", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True)
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert text == base.tokenizer.decode(outputs["poems", PROMPTS[0]], skip_special=True)


def test_base_and_adapter_requests_share_the_batch_each_correct(server, setup):
    """12 concurrent requests, 4 rows: base, sql and poems rows decode together (mixed-adapter steps)."""
    _, base, _, merged = setup
    jobs = _jobs()

    async def main():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
        outs = await asyncio.gather(*(client.completions.create(
            model=m, prompt=p, max_tokens=n, temperature=0, logprobs=0,
            extra_body={"return_tokens_as_token_ids": True}) for m, p, n in jobs))
        await client.close()
        return outs

    before = server.metric("lmlab_completion_tokens_total")
    outs = asyncio.run(main())
    eos = base.tokenizer.eos_id
    for (name, prompt, n), out in zip(jobs, outs):
        assert out.model == name
        ids = prompt_ids(base.tokenizer, prompt, base.bos)
        got = _token_ids(out.choices[0])
        if name == "run":  # a base row gets exact zeros from the adapters: the base's own output
            assert got == _greedy(base.model, ids, n, eos), (name, prompt)
        else:
            assert _agrees(merged[name], ids, got, _greedy(merged[name], ids, n, eos)), (name, prompt)
    assert server.metric("lmlab_completion_tokens_total") - before == sum(len(_token_ids(o.choices[0])) for o in outs)


# -- adapters that do not fit: one clear error at startup -----------------------------------------------
def test_missing_adapter_is_an_error_and_nonzero_exit(setup, tmp_path):
    run = setup[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "lmlab", "serve", str(run), "--port", "1", "--lora-modules",
                        f"gone={tmp_path / 'gone'}"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    gone = tmp_path / "gone"
    assert p.stderr.strip().splitlines() == [f"error: --lora-modules gone={gone}: {gone} is not a PEFT adapter "
                                             "directory (no adapter_config.json)"]


def test_adapters_that_do_not_fit_are_clear_errors(setup, tmp_path):
    run, base, paths, _ = setup

    def start(*specs: str) -> None:
        create_app(load_model(run), ServeConfig(lora_modules=list(specs)))

    # an adapter of another base: a wider model, same projections
    wider = build(dataclasses.replace(base.model.config, n_embd=48))
    _random_adapter(wider, tmp_path / "wider", 4, 8.0, ["q_proj"], seed=3)
    with pytest.raises(LmlabError, match=r"does not fit this base model: .*has shape"):
        start(f"wider={tmp_path / 'wider'}")
    # a tensor for a module this model does not have
    bad = tmp_path / "unknown"
    bad.mkdir()
    cfg = json.loads((paths["sql"] / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj", "gate_projx"]}))
    from safetensors.torch import load_file, save_file

    sd = load_file(str(paths["sql"] / "adapter_model.safetensors"))
    key = next(k for k in sd if ".q_proj.lora_A" in k)
    sd[key.replace("q_proj", "gate_projx")] = sd[key].clone()
    save_file(sd, str(bad / "adapter_model.safetensors"))
    with pytest.raises(LmlabError, match="gate_projx"):
        start(f"bad={bad}")
    # the spelling and the names
    with pytest.raises(LmlabError, match="NAME=PATH"):
        start(str(paths["sql"]))
    with pytest.raises(LmlabError, match="already taken"):
        start(f"a={paths['sql']}", f"a={paths['poems']}")
    with pytest.raises(LmlabError, match="already taken"):
        start(f"run={paths['sql']}")
