"""Supervised fine-tuning (SFT) data: chat conversations -> token shards with a loss mask, packed rows.

A conversation is a JSONL line `{"messages": [{"role": "user", "content": "..."}, ...]}`. It is
rendered with the model's own chat template (lmlab/tokenizers/chat_template.py, the sandbox `lmlab
chat` uses) and only the assistant's tokens are trained. Which tokens those are is found by rendering
successive prefixes of the conversation: message i adds `render(messages[:i + 1])` minus
`render(messages[:i])` to the text. Templates mark no spans themselves (SmolLM2's injects a default
system prompt and has no `{% generation %}` markers), so this is the only general way. For an
assistant message the generation prompt (`render(messages[:i], add_generation_prompt=True)`, e.g.
"<|im_start|>assistant\\n") is split off as context when the template has one: the model is trained
on what it will be asked to generate after that prompt at chat time: the content and the end-of-turn
token (and whatever the template writes after it, e.g. a newline).

Each piece is tokenized on its own, so token boundaries fall where the pieces meet, as they do at
chat time (the prompt is encoded whole, the reply generated token by token after it).

Training rows pack several short conversations (`PackedChats`): `document_ids` tell the model
(lmlab/models/transformer/decoder.py) to attend within each conversation only and restart positions
at each, and targets outside assistant turns are the ignore index, so a packed row's summed loss is
the sum of its conversations' losses computed alone.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.data.prepare import SPLITS, PrepareConfig, ShardWriter, _write_meta, assign_splits, token_dtype
from lmlab.data.sources import jsonl_records
from lmlab.errors import LmlabError
from lmlab.tokenizers.chat_template import ChatTemplate, chat_template_for
from lmlab.utils.atomic import atomic_dir

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
IGNORE = -100  # the targets' ignore index (F.cross_entropy's default, lmlab/nn/loss.py's)


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    where: str  # "file:line", for error messages


def read_chats(path: str | Path) -> list[Conversation]:
    """The conversations of a chat JSONL file; a bad line is an LmlabError naming file:line.
    Blank lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise LmlabError(f"chat data not found: {p}")
    out = [Conversation(_messages(row, f"{p}:{n}"), f"{p}:{n}") for n, row in jsonl_records(p)]
    if not out:
        raise LmlabError(f"{p} holds no conversations")
    return out


def _messages(row: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(row, dict) or "messages" not in row:
        raise LmlabError(f"{where}: expected an object with \"messages\": [{{\"role\", \"content\"}}, ...]")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise LmlabError(f"{where}: \"messages\" must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise LmlabError(f"{where}: message {i} must be an object with a string \"content\"")
        if m.get("role") not in ROLES:
            raise LmlabError(f"{where}: message {i} has role {m.get('role')!r} (expected {' | '.join(ROLES)})")
        if not m["content"].strip():
            raise LmlabError(f"{where}: message {i} ({m['role']}) is empty")
    if not any(m["role"] == "assistant" for m in messages):
        raise LmlabError(f"{where}: no assistant message, so nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def chat_segments(template: ChatTemplate, messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation as consecutive (text, trained) pieces: the text each message's render
    adds, trained for assistant messages, with the generation prompt before an assistant message as an
    untrained piece of its own (when the template renders one that fits)."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        full = template.render(messages[:i + 1], add_generation_prompt=False)
        if m["role"] == "assistant":
            prompt = template.render(messages[:i], add_generation_prompt=True)
            if prompt.startswith(done) and full.startswith(prompt):
                pieces.append((prompt[len(done):], False))
                done = prompt
        if not full.startswith(done):
            raise LmlabError(f"the chat template renders messages[:{i + 1}] as a text that does not continue "
                             f"the render of messages[:{i}], so the assistant's tokens cannot be found by prefixes")
        pieces.append((full[len(done):], m["role"] == "assistant"))
        done = full
    return [(t, trained) for t, trained in pieces if t]


def encode_chat(template: ChatTemplate, tokenizer: Any, messages: Sequence[dict[str, str]],
                bos: Sequence[int] = ()) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is trained (a loss target).
    `bos` (the model's, lmlab.io.load's rule) goes first, untrained, unless the template wrote it."""
    ids: list[int] = []
    trained: list[bool] = []
    for text, is_trained in chat_segments(template, messages):
        piece = tokenizer.encode(text, allow_special=True)
        ids += piece
        trained += [is_trained] * len(piece)
    bos = list(bos)
    if bos and ids[:len(bos)] != bos:
        ids, trained = bos + ids, [False] * len(bos) + trained
    return ids, trained


def chat_tokenizer(spec: str | Path) -> tuple[Any, list[int]]:
    """The tokenizer (with its chat template) and BOS of a model: a GGUF file (read without its weights),
    a Hugging Face directory, an lmlab run, or a directory holding a tokenizer.json."""
    from lmlab.io.load import gguf_bos, hf_bos, model_kind
    from lmlab.tokenizers import load_tokenizer

    p = Path(spec)
    if not p.exists():
        raise LmlabError(f"--tokenizer {p}: not found (give the model whose chat template to use)")
    kind = model_kind(p)
    if kind == "gguf":
        from lmlab.io.gguf.read import open_gguf, read_metadata
        from lmlab.io.gguf.tokenizer import tokenizer_from_gguf

        meta = read_metadata(open_gguf(p))
        tok = tokenizer_from_gguf(meta)
        return tok, gguf_bos(meta, tok)
    if kind == "hf" or (p / "tokenizer.json").is_file():
        tok = load_tokenizer(p)
        return tok, hf_bos(p, tok)
    from lmlab.io.checkpoint import resolve_checkpoint

    tok = load_tokenizer(resolve_checkpoint(p))
    return tok, [tok.eos_id]  # lmlab runs: every training document followed a </s>


def prepare_chat(cfg: PrepareConfig, out: Path, force: bool) -> Path:
    """`lmlab prepare CHAT.jsonl --format chat --tokenizer MODEL`: token shards,
    a mask shard per token shard (1 = trained target) and each split's conversation starts."""
    t0 = time.time()
    if cfg.tokenizer in ("char", "word", "bpe"):
        raise LmlabError("--format chat needs --tokenizer MODEL: the model whose chat template and tokenizer "
                         "to use (a GGUF file, a Hugging Face directory, an lmlab run)")
    chats = read_chats(cfg.source)
    tok, bos = chat_tokenizer(cfg.tokenizer)
    template = chat_template_for(tok)
    keys = [json.dumps(c.messages, sort_keys=True, ensure_ascii=False) for c in chats]
    split_of = assign_splits(keys, cfg.seed, cfg.val_fraction, cfg.test_fraction, name=cfg.source)
    with atomic_dir(out, replace=force) as tmp:
        tok.save(str(tmp))
        dtype = token_dtype(tok.vocab_size)
        tokens = {s: ShardWriter(tmp, s, dtype, cfg.shard_tokens) for s in SPLITS}
        masks = {s: ShardWriter(tmp, f"{s}-mask", np.dtype(np.uint8), cfg.shard_tokens) for s in SPLITS}
        starts: dict[str, list[int]] = {s: [0] for s in SPLITS}
        trained_count = dict.fromkeys(SPLITS, 0)
        for chat, k in zip(chats, split_of):
            s = SPLITS[int(k)]
            try:
                ids, trained = encode_chat(template, tok, chat.messages, bos)
            except LmlabError as e:
                raise LmlabError(f"{chat.where}: {e}") from None
            tokens[s].write(np.asarray(ids, dtype=np.int64))
            masks[s].write(np.asarray(trained, dtype=np.uint8))
            starts[s].append(starts[s][-1] + len(ids))
            trained_count[s] += sum(trained)
        splits, chat_meta = {}, {}
        for s in SPLITS:
            tokens[s].close()
            masks[s].close()
            (tmp / f"{s}-starts.bin").write_bytes(np.asarray(starts[s], dtype=np.int64).tobytes())
            n_conv = len(starts[s]) - 1
            splits[s] = {"shards": tokens[s].shards, "n_tokens": starts[s][-1], "n_docs": n_conv, "n_bytes": 0}
            chat_meta[s] = {"masks": masks[s].shards, "starts": f"{s}-starts.bin", "n_conversations": n_conv,
                            "n_trained": trained_count[s]}
        corpus = {"source": str(cfg.source), "n_conversations": len(chats)}
        extra = {"chat": {"splits": chat_meta, "bos": bos, "template": template.source, "ignore_index": IGNORE}}
        _write_meta(tmp, out, cfg, tok, dtype, corpus, splits, t0, extra)
    log.info(f"{cfg.source}: {len(chats)} conversations, {sum(trained_count.values()):,} trained tokens")
    return out


class PackedChats:
    """Batches of rows of `block_size` positions, each packing whole conversations of one split.

    An epoch packs the conversations in a seeded random order (file order with `shuffle=False`)
    first-come into rows (next-fit: a conversation that does not fit starts the next row); the rest of
    a row is padding (target IGNORE, a document of its own). A conversation longer than block_size + 1
    tokens is cut to that length. The sampler's position is (epoch, row), so resuming is exact."""

    kind = "packed_chat"

    def __init__(self, data: Any, block_size: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        info = data.meta.get("chat", {}).get("splits", {}).get(data.split)
        if info is None:
            raise LmlabError(f"{data.dir} holds no chat data for split '{data.split}' (lmlab prepare --format chat)")
        self.block_size, self.batch_size, self.seed, self.shuffle = block_size, batch_size, seed, shuffle
        self.tokens = data.tokens()
        masks = [np.fromfile(data.dir / m["file"], dtype=np.uint8) for m in info["masks"] if m["n_tokens"] > 0]
        self.trained = np.concatenate(masks).astype(bool) if masks else np.zeros(0, dtype=bool)
        bounds = np.fromfile(data.dir / info["starts"], dtype=np.int64)
        cut = [(int(s), int(min(e, s + block_size + 1))) for s, e in zip(bounds[:-1], bounds[1:])]
        # a conversation trains on targets 1..n-1; one cut before any assistant token has none
        self.conversations = [(s, e) for s, e in cut if e - s >= 2 and self.trained[s + 1:e].any()]
        n_cut = sum(e < t for (_, e), t in zip(cut, bounds[1:]))
        if n_cut:
            log.warning(f"{n_cut} of {len(cut)} conversations in {data.dir} ({data.split}) are longer than "
                        f"block_size + 1 = {block_size + 1} tokens and were cut "
                        f"({len(cut) - len(self.conversations)} left with no assistant token)")
        if not self.conversations:
            raise LmlabError(f"split '{data.split}' of {data.dir} has no conversation with an assistant token "
                             f"within block_size + 1 = {block_size + 1} tokens")
        self.epoch, self.row = 0, 0
        self._rows = self._pack(0)

    def _pack(self, epoch: int) -> list[list[int]]:
        n = len(self.conversations)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        rows: list[list[int]] = [[]]
        used = 0
        for i in order:
            s, e = self.conversations[i]
            if used + (e - s - 1) > self.block_size:
                rows.append([])
                used = 0
            rows[-1].append(int(i))
            used += e - s - 1
        return rows

    def row_tensors(self, conversations: Sequence[int]) -> dict[str, torch.Tensor]:
        """One packed row: input_ids, targets (IGNORE where not trained) and document_ids, [block_size] each."""
        T = self.block_size
        x = np.zeros(T, dtype=np.int64)
        y = np.full(T, IGNORE, dtype=np.int64)
        doc = np.full(T, len(conversations), dtype=np.int64)  # padding: a document of its own
        at = 0
        for d, i in enumerate(conversations):
            s, e = self.conversations[i]
            n = e - s - 1
            x[at:at + n] = self.tokens[s:e - 1]
            y[at:at + n] = np.where(self.trained[s + 1:e], self.tokens[s + 1:e], IGNORE)
            doc[at:at + n] = d
            at += n
        return {"input_ids": torch.from_numpy(x), "targets": torch.from_numpy(y), "document_ids": torch.from_numpy(doc)}

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(self.batch_size):
            if self.row >= len(self._rows):
                self.epoch, self.row = self.epoch + 1, 0
                self._rows = self._pack(self.epoch)
            rows.append(self.row_tensors(self._rows[self.row]))
            self.row += 1
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def state_dict(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "epoch": self.epoch, "row": self.row}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.row = int(state["seed"]), int(state["epoch"]), int(state["row"])
        self._rows = self._pack(self.epoch)
