"""The run configuration: model, data and training sections, saved as config.yaml in every run."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmlab.models.base import ModelConfig
from lmlab.models.transformer.gpt import GPTConfig
from lmlab.nn.lora import LoRAConfig


@dataclass(kw_only=True)
class DataConfig:
    dir: str = "data/stdlib-docs"   # a directory made by `lmlab prepare`
    sampler: str = "random"         # random | sequential windows for training
    seq2seq: str = ""               # JSONL of {"source", "target"} pairs to train an encoder-decoder on
    augment: int = 0                # images: shift each training image by up to this many pixels


@dataclass(kw_only=True)
class TrainConfig:
    out_dir: str = ""               # run directory (default: runs/<family>-<timestamp>)
    init: str = ""                  # start from this model's weights (GGUF, HF directory, lmlab run): continued
                                    # pre-training; the model section then describes it (`lmlab train --init`)
    seed: int = 1337                # initialisation (and dropout); also the data order unless data_seed is set
    data_seed: int = -1             # the order training windows are drawn in (-1: the same as seed); fixing it
                                    # across seeds varies only the initialisation (a paired comparison)
    device: str = "auto"            # auto | cpu | cuda | mps
    dtype: str = "float32"          # float32 | bfloat16 (autocast; weights and optimizer stay fp32)
    compile: bool = False           # torch.compile the model (applied from outside it)
    checkpointing: bool = False     # recompute each block's activations in the backward pass (less memory)
    parallel: str = "ddp"           # under torchrun: ddp (data parallel) | none; one process: ignored
    threads: int = 0                # torch CPU threads (0: torch's default)
    batch_size: int = 16            # the global micro-batch (split across torchrun processes)
    grad_accum: int = 1             # micro-batches per optimizer step
    max_steps: int = 1000
    stop_at_step: int = 0           # stop early (with a checkpoint) without changing the schedule
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    schedule: str = "cosine"        # cosine | constant | wsd
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0          # max global grad norm (0: off)
    log_interval: int = 10
    eval_interval: int = 200
    eval_iters: int = 20            # validation batches per evaluation
    ckpt_interval: int = 500
    keep_checkpoints: int = 2       # most recent checkpoints kept (0: all)
    progress: bool = True           # progress bar on stderr


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # rank > 0: train LoRA adapters, the base frozen
