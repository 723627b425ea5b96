"""Windows of tokens read straight from memmap shards (the corpus never has to fit in RAM).

Samplers are resumable: their whole position is `state_dict()`, a few integers, saved with every
checkpoint. The random sampler derives batch `i` from `(seed, i)` alone, so resuming is exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmlab.data.prepare import read_meta
from lmlab.errors import LmlabError


class TokenSplit:
    """One split of a prepared data directory: a sequence of memmapped shards."""

    def __init__(self, data_dir: str | Path, split: str):
        self.dir = Path(data_dir)
        self.meta = read_meta(self.dir)
        if split not in self.meta["splits"]:
            raise LmlabError(f"{data_dir} has no split '{split}' (has {', '.join(self.meta['splits'])})")
        self.split = split
        info = self.meta["splits"][split]
        dtype = np.dtype(self.meta["dtype"])
        self.shards = [np.memmap(self.dir / s["file"], dtype=dtype, mode="r")
                       for s in info["shards"] if s["n_tokens"] > 0]
        self.n_tokens = sum(len(s) for s in self.shards)
        self.n_bytes = info.get("n_bytes", 0)

    def __len__(self) -> int:
        return self.n_tokens

    def tokens(self) -> np.ndarray:
        """All tokens of the split, concatenated (for small eval splits)."""
        if not self.shards:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.asarray(s, dtype=np.int64) for s in self.shards])


class RandomWindows:
    """Batches of `batch_size` random windows of `block_size + 1` tokens (inputs and targets)."""

    def __init__(self, data: TokenSplit, block_size: int, batch_size: int, seed: int = 0):
        self.data, self.block_size, self.batch_size, self.seed = data, block_size, batch_size, seed
        span = block_size + 1
        starts = [max(0, len(s) - span + 1) for s in data.shards]
        if sum(starts) == 0:
            raise LmlabError(f"split '{data.split}' of {data.dir} has {len(data)} tokens, fewer than "
                             f"block_size + 1 = {span}; use a smaller --model.block_size or more text")
        self._usable = [i for i, n in enumerate(starts) if n > 0]
        self._cum = np.cumsum([starts[i] for i in self._usable])
        self.step = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.step])
        self.step += 1
        picks = rng.integers(0, int(self._cum[-1]), size=self.batch_size)
        which = np.searchsorted(self._cum, picks, side="right")
        offsets = picks - np.concatenate([[0], self._cum[:-1]])[which]
        span = self.block_size + 1
        rows = np.stack([self.data.shards[self._usable[w]][o:o + span] for w, o in zip(which, offsets)])
        t = torch.from_numpy(rows.astype(np.int64))
        return t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict:
        return {"kind": "random", "seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])


class SequentialWindows:
    """Consecutive windows in corpus order; a pass over the split is an epoch, then it wraps.

    Windows overlap by one token (the last target of a window is the next window's first input),
    so every token is a target exactly once per epoch; a tail shorter than a window is skipped.
    """

    def __init__(self, data: TokenSplit, block_size: int, batch_size: int, seed: int = 0):
        self.data, self.block_size, self.batch_size = data, block_size, batch_size
        if len(data) < block_size + 1:
            raise LmlabError(f"split '{data.split}' has {len(data)} tokens, fewer than block_size + 1")
        self._bounds = np.cumsum([0] + [len(s) for s in data.shards])
        self.position = 0
        self.epoch = 0

    def _slice(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the split, across shard boundaries."""
        out = []
        i = int(np.searchsorted(self._bounds, start, side="right")) - 1
        while n > 0:
            off = start - int(self._bounds[i])
            piece = np.asarray(self.data.shards[i][off:off + n], dtype=np.int64)
            out.append(piece)
            n, start, i = n - len(piece), start + len(piece), i + 1
        return np.concatenate(out)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.block_size + 1
        rows = []
        for _ in range(self.batch_size):
            if self.position + span > len(self.data):
                self.position, self.epoch = 0, self.epoch + 1
            rows.append(self._slice(self.position, span))
            self.position += self.block_size
        t = torch.from_numpy(np.stack(rows))
        return t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict:
        return {"kind": "sequential", "position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.epoch = int(state["position"]), int(state["epoch"])


class CorruptedWindows:
    """Wraps a window sampler and corrupts each batch for a denoising objective (MLM, infilling).

    Subclasses set `kind`, a random `stream` id apart from the windows' own, and `corrupt(x, rng)`
    returning (inputs, targets). Batch i depends on (seed, i) only, so resuming is exact."""

    kind = "corrupted"
    stream = 0

    def __init__(self, windows, cfg, seed: int = 0):
        self.windows, self.cfg, self.seed = windows, cfg, seed
        self.step = 0

    def corrupt(self, x: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = self.windows.next_batch()
        rng = np.random.default_rng([self.seed, self.step, self.stream])
        self.step += 1
        return self.corrupt(x, rng)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "step": self.step, "windows": self.windows.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])
        self.windows.load_state_dict(state["windows"])


SAMPLERS = {"random": RandomWindows, "sequential": SequentialWindows}
