"""`lmlab train --init MODEL` (continued pre-training, full or LoRA) from a tiny random transformers Llama saved
as a Hugging Face directory and as a quantized GGUF; the runs load, generate and export."""

import json

import pytest
import torch
from peers import require_module

from lmlab.cli import main
from lmlab.data.objectives import make_sampler
from lmlab.data.prepare import PrepareConfig, prepare
from lmlab.data.stream import TokenSplit
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import list_checkpoints
from lmlab.io.load import load_model
from lmlab.nn.lora import lora_layers
from lmlab.nn.quant import Int4Linear
from lmlab.tokenizers import BPETokenizer

transformers = require_module("transformers")
require_module("gguf")
from transformers import LlamaConfig as HFLlamaConfig  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()
LINES = [f"the {w} sat on the {v} number {i}" for i, (w, v) in
         enumerate([("cat", "mat"), ("dog", "log"), ("bird", "wire"), ("fox", "box")] * 40)]
BLOCK, BATCH, SEED = 16, 4, 7
TRAIN = ["--train.batch_size=4", "--train.progress=false", "--train.log_interval=1", "--train.eval_iters=2",
         "--train.eval_interval=0", "--train.warmup_steps=0", "--train.max_steps=3", "--train.lr=1e-2",
         f"--train.seed={SEED}", f"--model.block_size={BLOCK}"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same tiny random Llama as an HF directory and as a Q8_0 GGUF, and the corpus (a text file)."""
    root = tmp_path_factory.mktemp("init")
    (root / "corpus.txt").write_text("\n\n".join(LINES))
    tok = BPETokenizer.train(LINES, vocab_size=300, min_count=1)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(HFLlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
        initializer_range=0.3,  # spread logits: a batch's loss depends on the weights, not ~ln(vocab)
        bos_token_id=None, eos_token_id=None, pad_token_id=None))
    hf.save_pretrained(root / "hf")
    tok.save(str(root / "hf"))
    from lmlab.io.gguf.write import save_gguf

    gguf = save_gguf(load_model(root / "hf").model, root / "tiny.Q8_0.gguf", tok, qtype="Q8_0")
    data = prepare(PrepareConfig(source=str(root / "corpus.txt"), out=str(root / "data"), tokenizer=str(root / "hf"),
                                 doc_split="paragraph"))
    return {"hf": root / "hf", "gguf": gguf, "data": data, "corpus": root / "corpus.txt", "root": root}


def first_batch_loss(model_path, data):
    """The loss of the source model on the run's first training batch (same sampler, same seed)."""
    model = load_model(model_path, precision="fp32").model
    x, y = make_sampler("random", TokenSplit(data, "train"), model, BLOCK, BATCH, seed=SEED).next_batch()
    with torch.no_grad():
        return model(x, y).loss.item()


def metrics(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_init_continues_training_from_the_models_weights(sources, tmp_path, kind, capsys):
    run = tmp_path / "run"
    assert main(["train", "--init", str(sources[kind]), "--data", str(sources["data"]), "--out", str(run), *TRAIN]) == 0
    rows = metrics(run)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    # step 1's loss is the source model's on the first batch: the run started from its (dequantized) weights
    want = first_batch_loss(sources[kind], sources["data"])
    assert rows[0]["loss"] == pytest.approx(want, rel=1e-5)
    assert abs(want - first_batch_loss(sources["hf" if kind == "gguf" else "gguf"], sources["data"])) > 1e-4
    cfg = (run / "config.yaml").read_text()
    assert "family: llama" in cfg and f"init: {sources[kind]}" in cfg
    # the run is a model like any other: generate, and export as an HF directory transformers loads
    assert main(["generate", str(run), "the cat", "--max_new_tokens", "3", "--temperature", "0"]) == 0
    assert main(["export", str(run), str(tmp_path / "out"), "--to", "hf"]) == 0
    ours = load_model(run).model
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(0, ours.config.vocab_size, (2, 10))
    assert main(["export", str(run), str(tmp_path / "out.gguf"), "--to", "gguf", "--qtype", "F32"]) == 0
    from_gguf = load_model(tmp_path / "out.gguf", precision="fp32").model
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x).logits, from_gguf(x).logits, rtol=1e-5, atol=1e-5)
    capsys.readouterr()


def test_gguf_export_keeps_the_tokenizers_split_rule(tmp_path):
    """A model continued from SmolLM2 goes out to GGUF with SmolLM2's pre-tokenizer (digits one by one)."""
    from peers import smollm2_gguf

    from lmlab.io.gguf.write import save_gguf
    from lmlab.io.load import model_tokenizer
    from lmlab.models.transformer.llama import Llama, LlamaConfig

    tok = model_tokenizer(smollm2_gguf())
    model = Llama(LlamaConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=32, mlp_hidden=32,
                              block_size=32))
    back = model_tokenizer(save_gguf(model, tmp_path / "m.gguf", tok))
    text = "In 2024 the 12345 apples cost $3.50"
    assert back.encode(text) == tok.encode(text)
    assert len([t for t in tok.encode(text) if tok.decode([t]).strip().isdigit()]) == 12  # one per digit
    assert back.chat_template == tok.chat_template


def test_lora_run_keeps_its_base_and_exports_adapter_and_merged_model(sources, tmp_path, capsys):
    peft = require_module("peft")
    run = tmp_path / "lora"
    assert main(["train", "--init", str(sources["hf"]), "--data", str(sources["data"]), "--out", str(run), *TRAIN,
                 "--lora.rank", "2", "--lora.alpha", "5", "--lora.targets", "q_proj,v_proj,o_proj,down_proj"]) == 0
    assert "trainable parameters" in capsys.readouterr().out
    assert metrics(run)[0]["loss"] == pytest.approx(first_batch_loss(sources["hf"], sources["data"]), rel=1e-5)
    source = load_model(sources["hf"]).model.state_dict()
    trained = load_model(run).model
    adapted = {f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.down")}
    assert set(lora_layers(trained)) == adapted
    for name, t in trained.state_dict().items():  # the base bitwise unchanged
        if "lora_" not in name:
            assert torch.equal(t, source[name.replace(".base.", ".")]), name
    assert main(["export", str(run), str(tmp_path / "adapter"), "--to", "peft"]) == 0
    assert main(["export", str(run), str(tmp_path / "merged"), "--to", "hf"]) == 0
    x = torch.randint(0, trained.config.vocab_size, (2, 10))
    with torch.no_grad():
        want = trained(x).logits
        base = LlamaForCausalLM.from_pretrained(sources["hf"]).eval()
        got_peft = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(x).logits
        merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()(x).logits
        # the adapter directory names its local base, so the loader opens it as a model too
        reloaded = load_model(tmp_path / "adapter").model(x).logits
    for got in (got_peft, merged, reloaded):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_lora_over_int4_base_trains_and_reloads(sources, tmp_path):
    from safetensors import safe_open

    run = tmp_path / "qlora"
    assert main(["train", "--init", str(sources["gguf"]), "--data", str(sources["data"]), "--out", str(run), *TRAIN,
                 "--lora.rank", "4", "--lora.targets", "q_proj,k_proj,v_proj,gate_proj,up_proj",
                 "--lora.base", "int4"]) == 0
    ckpt = list_checkpoints(run)[-1]
    source = load_model(sources["gguf"], precision="fp32").model
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        # every Linear of the blocks kept in 4 bits, exactly the source's weights quantized; the adapters trained
        for name, linear in (("blocks.0.attn.qkv.base", source.blocks[0].attn.qkv),
                             ("blocks.1.mlp.down", source.blocks[1].mlp.down)):
            assert torch.equal(f.get_tensor(f"{name}.qs"), Int4Linear(linear.weight).qs)
        assert f.get_tensor("blocks.1.mlp.up.lora_B.gate_proj").abs().max() > 0
    assert main(["eval", str(run), "--data", str(sources["data"]), "--split", "val"]) == 0


def test_mismatches_are_clear_errors(sources, tmp_path, capsys):
    other = prepare(PrepareConfig(source=str(sources["corpus"]), out=str(tmp_path / "own"), vocab_size=280,
                                  min_count=1))  # its own BPE
    assert main(["train", "--init", str(sources["hf"]), "--data", str(other), "--out", str(tmp_path / "r1"),
                 *TRAIN]) == 2
    assert "prepare the corpus with the model's tokenizer" in capsys.readouterr().err
    assert main(["train", "--init", str(sources["hf"]), "--model", "mini", "--data", str(sources["data"]),
                 "--out", str(tmp_path / "r2")]) == 2
    assert "drop --model mini" in capsys.readouterr().err
    assert main(["train", "--init", str(sources["gguf"]), "--data", str(sources["data"]), "--out", str(tmp_path / "r3"),
                 *TRAIN, "--model.n_embd=64"]) == 2
    assert "do not fit" in capsys.readouterr().err
    assert main(["train", "--init", str(tmp_path / "nope.gguf"), "--data", str(sources["data"])]) == 2
    assert "model not found" in capsys.readouterr().err
    assert main(["train", "--init", str(sources["hf"]), "--data", str(sources["data"]), "--out", str(tmp_path / "r4"),
                 *TRAIN, "--lora.rank=2", "--lora.targets=c_attn"]) == 2
    assert "unknown lora target 'c_attn'" in capsys.readouterr().err
    assert main(["export", str(sources["hf"]), str(tmp_path / "a"), "--to", "peft"]) == 2
    assert "no LoRA adapters" in capsys.readouterr().err
    with pytest.raises(LmlabError, match="not a local path"):
        json_dir = tmp_path / "adapter"
        json_dir.mkdir()
        (json_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2,
                                                                  "base_model_name_or_path": "HuggingFaceTB/x"}))
        (json_dir / "adapter_model.safetensors").write_bytes(b"")
        load_model(json_dir)
