"""The server's one model thread: a bounded waiting queue in front of a continuously batched decoder.

Every model call runs on this thread (torch holds its own intra-op threads; the event loop only
parses, validates and streams, so it stays responsive while a step runs). Each loop iteration:
  1. drops sequences whose client went away (`Sequence.cancel`), freeing their rows at once;
  2. prefills waiting sequences into free rows (prompts join as they arrive, not at batch edges);
  3. runs one decode step for every occupied row and hands each sequence its new text.
Results go back to the event loop through `loop.call_soon_threadsafe` onto the sequence's own
`asyncio.Queue` (one per request, shared by its choices): (index, "token", Piece) events, then one
(index, "done", finish_reason) or (index, "error", message).

A full waiting queue refuses new work (`submit` returns False: the app answers 503 + Retry-After)
instead of letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from lmlab.generate.continuous import Slot, SlotDecoder, TokenInfo
from lmlab.generate.engine import Detokenizer, SamplingConfig

log = logging.getLogger("lmlab.serve")


@dataclass
class Piece:
    text: str                      # printable text this token completed ("" while held back)
    info: TokenInfo                # the token, its logprob and top alternatives when asked


@dataclass(eq=False)
class Sequence:
    """One choice of one request: a prompt and its settings, and the queue its events go to."""

    prompt: list[int]
    cfg: SamplingConfig
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue              # shared by the request's choices: (index, kind, value)
    index: int = 0                     # the choice's index in the response
    logprobs: int | None = None
    prompt_logprobs: bool = False
    adapter: int = 0                   # its LoRA adapter's row index (lmlab/serve/adapters.py); 0: the base
    cancelled: bool = False
    prompt_info: list[TokenInfo | None] = field(default_factory=list)
    n_new: int = 0
    submitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None

    def cancel(self) -> None:
        """The client went away: the scheduler frees the row before its next step."""
        self.cancelled = True

    def _emit(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, kind, value))


class Scheduler:
    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int, max_len: int, max_queue: int,
                 metrics: Any = None, adapters: Any = None):
        self.tokenizer, self.metrics = tokenizer, metrics
        # with LoRA adapters, rows of different adapters share the batch (lmlab/nn/multi_lora.py)
        self.decoder = SlotDecoder(model, max_batch=max_batch, max_len=max_len, eos_id=tokenizer.eos_id,
                                   adapters=adapters)
        self.max_queue = max_queue
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: dict[Slot, tuple[Sequence, Detokenizer]] = {}
        self.lock = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="lmlab-scheduler", daemon=True)

    @property
    def max_len(self) -> int:
        return self.decoder.max_len

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.running)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """End the loop: sequences still waiting or running end with finish_reason "abort" (their
        responses end normally, so clients see a clean end, not a cut connection). `timeout=None`:
        do not wait for the thread (the event loop calls this and must not block on a decode step)."""
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if timeout is not None and self.thread.is_alive():
            self.thread.join(timeout)

    def submit(self, seqs: list[Sequence]) -> bool:
        """Queue all of a request's sequences, or none when the queue has no room for them."""
        with self.lock:
            if self.stopping or len(self.waiting) + len(seqs) > self.max_queue:
                return False
            self.waiting.extend(seqs)
            self.lock.notify()
        return True

    # -- the loop ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.lock:
                while not self.stopping and not self.waiting and not self.running:
                    self.lock.wait()
                if self.stopping:
                    break
            try:
                self._iteration()
            except Exception as e:  # a bug must not wedge the server: fail what is in flight, go on
                log.exception("scheduler step failed")
                for seq, _ in list(self.running.values()):
                    seq._emit("error", f"internal error: {type(e).__name__}")
                for slot in list(self.running):
                    self._leave(slot)
            self._observe()
        for seq in list(self.waiting) + [s for s, _ in self.running.values()]:
            seq._emit("done", "abort")

    def _leave(self, slot: Slot) -> None:
        self.running.pop(slot, None)
        self.decoder.remove(slot)

    def _finish(self, slot: Slot, reason: str, tail: str = "") -> None:
        seq, _ = self.running[slot]
        if tail:
            seq._emit("token", Piece(tail, TokenInfo(-1)))  # held-back text: no token of its own
        seq._emit("done", reason)
        self._leave(slot)

    def _iteration(self) -> None:
        for slot, (seq, _) in list(self.running.items()):
            if seq.cancelled:
                self._leave(slot)
        while self.decoder.free:
            with self.lock:
                seq = self.waiting.popleft() if self.waiting else None
            if seq is None:
                break
            if seq.cancelled:
                continue
            self._admit(seq)
        if self.running:
            for slot, info in self.decoder.step():
                self._token(slot, info)

    def _admit(self, seq: Sequence) -> None:
        slot = Slot(seq.prompt, seq.cfg, logprobs=seq.logprobs, prompt_logprobs=seq.prompt_logprobs,
                    adapter=seq.adapter)
        try:
            seq.prompt_info, info = self.decoder.add(slot)
        except Exception as e:  # e.g. a prompt longer than the context (the app checks first)
            seq._emit("error", str(e))
            return
        self.running[slot] = (seq, Detokenizer(self.tokenizer, seq.cfg.stop))
        seq.first_token = time.monotonic()
        if self.metrics is not None:
            self.metrics.ttft.observe(seq.first_token - seq.submitted)
        self._token(slot, info)

    def _token(self, slot: Slot, info: TokenInfo) -> None:
        seq, detok = self.running[slot]
        seq.n_new += 1
        if info.token == self.decoder.eos_id:  # EOS ends the text and is not part of it
            self._finish(slot, "stop", detok.flush())
            return
        text = detok.push(info.token)
        if detok.stopped:
            seq._emit("token", Piece(text, info))
            self._finish(slot, "stop")
        elif self.decoder.finished(slot):
            text += detok.flush()  # the held-back rest, which may still hold a stop string
            seq._emit("token", Piece(text, info))
            self._finish(slot, "stop" if detok.stopped or info.token == self.decoder.eos_id else "length")
        else:
            seq._emit("token", Piece(text, info))

    def _observe(self) -> None:
        if self.metrics is not None:
            self.metrics.queue.set(len(self.waiting))
            self.metrics.batch.set(len(self.running))
