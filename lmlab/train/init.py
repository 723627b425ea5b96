"""Starting a run from a pretrained model (`lmlab train --init MODEL`): continued pre-training or fine-tuning.

MODEL is anything the one loader opens (a GGUF file, a Hugging Face directory, an lmlab run, a PEFT
adapter on a local base). The run takes its architecture and its tokenizer from it: the model section
of the run's config is MODEL's config, the prepared data must have been tokenised with MODEL's own
tokenizer (`lmlab prepare CORPUS --tokenizer MODEL`), and the weights are loaded in float32 (a
quantized GGUF's dequantized, a LoRA source's adapters merged into them).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lmlab.errors import LmlabError
from lmlab.io.load import load_model, model_tokenizer
from lmlab.nn.lora import merge_lora
from lmlab.tokenizers import load_tokenizer, vocabulary


def check_tokenizer(data_dir: str | Path, model_path: str | Path) -> None:
    """The data was tokenised with the model's tokenizer: the same token for every id."""
    data_tok, model_tok = load_tokenizer(data_dir), model_tokenizer(model_path)
    fix = f"prepare the corpus with the model's tokenizer: lmlab prepare CORPUS --tokenizer {model_path}"
    ours, theirs = vocabulary(data_tok), vocabulary(model_tok)
    if len(ours) != len(theirs):
        raise LmlabError(f"the data in {data_dir} has a vocabulary of {len(ours)} tokens, the model {model_path} "
                         f"one of {len(theirs)}; {fix}")
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            raise LmlabError(f"token {i} is {a!r} in the data's tokenizer ({data_dir}) but {b!r} in the model's "
                             f"({model_path}); {fix}")


def load_init_weights(model: nn.Module, path: str | Path) -> None:
    """Copy the weights of the model at `path` into `model` (built from its config, perhaps with
    overrides such as a shorter block_size); weights that do not fit are an LmlabError."""
    source = merge_lora(load_model(path, precision="fp32").model)
    state = source.state_dict()
    ours = model.state_dict()
    # a head the source lacks (a classifier on an MLM-pretrained encoder) keeps its fresh initialisation
    fresh = tuple(getattr(model, "new_weights", ()))
    kept = sorted(k for k in set(ours) - set(state) if fresh and k.startswith(fresh))
    state = {**state, **{k: ours[k] for k in kept}}
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    misshapen = [k for k in set(ours) & set(state) if ours[k].shape != state[k].shape]
    if missing or unexpected or misshapen:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected else
                  f"'{misshapen[0]}' is {tuple(state[misshapen[0]].shape)} there, {tuple(ours[misshapen[0]].shape)} "
                  "here")
        raise LmlabError(f"--init {path}: its weights do not fit the run's model config ({detail}); with --init the "
                         "architecture comes from the model (drop --model / model overrides that change shapes)")
    model.load_state_dict(state)
