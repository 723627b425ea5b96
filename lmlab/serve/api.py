"""`/v1/completions` and `/v1/chat/completions`: requests become sequences for the scheduler, its
events become OpenAI responses (one JSON object, or server-sent events ending in `data: [DONE]`).

Streaming is the one path: a non-streamed response drains the same events (tinygrad's serve does
the same). A client that goes away cancels its sequences, which frees their rows before the next
decode step: a stream notices when Starlette cancels it, a plain request by polling the connection.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from lmlab.generate.continuous import TokenInfo
from lmlab.generate.engine import SamplingConfig, prompt_ids
from lmlab.serve.protocol import ApiError, ChatRequest, CompletionRequest
from lmlab.serve.scheduler import Piece, Sequence


@dataclass
class Choice:
    text: list[str] = field(default_factory=list)
    tokens: list[TokenInfo] = field(default_factory=list)
    finish: str | None = None
    n_new: int = 0


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


class Api:
    """The generation endpoints over one loaded model (`state`: lmlab.serve.app.ServerState)."""

    def __init__(self, state: Any):
        self.state = state
        self.tok = state.tokenizer

    # -- requests -> sequences ------------------------------------------------------------------
    def _model(self, name: str) -> tuple[str, int]:
        """The model a request names: (its name in responses, its LoRA adapter's row index; 0: the base)."""
        if name in (self.state.model_name, "default"):
            return self.state.model_name, 0
        if name in self.state.adapters:
            return name, self.state.adapters[name]
        have = "', '".join([self.state.model_name, *self.state.adapters])
        raise ApiError(404, f"the model '{name}' does not exist; this server has '{have}'", param="model",
                       code="model_not_found")

    def _check_ids(self, ids: list[int], param: str) -> None:
        V = self.state.vocab_size
        bad = next((t for t in ids if not 0 <= t < V), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary (0..{V - 1})", param=param,
                           code="invalid_token_id")
        if len(ids) >= self.state.scheduler.max_len:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server's context holds "
                           f"{self.state.scheduler.max_len} (prompt + completion)", param=param,
                           code="context_length_exceeded")

    def _cfg(self, req: Any, max_tokens: int | None, n_prompt: int, choice: int) -> SamplingConfig:
        room = self.state.scheduler.max_len - n_prompt
        return SamplingConfig(max_new_tokens=min(max_tokens or room, room),
                              temperature=1.0 if req.temperature is None else req.temperature,
                              top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                              seed=None if req.seed is None else req.seed + choice, stop=_stops(req.stop))

    def _submit(self, seqs: list[Sequence]) -> None:
        if len(seqs) > self.state.scheduler.max_queue:  # could never fit: a retry after 503 would loop
            raise ApiError(400, f"the request asks for {len(seqs)} sequences (prompts x n); this server queues "
                           f"at most {self.state.scheduler.max_queue}", param="n", code="too_many_sequences")
        if not self.state.scheduler.submit(seqs):
            raise ApiError(503, "the server is busy (its queue is full); retry shortly", code="queue_full",
                           headers={"Retry-After": "1"})
        self.state.metrics.prompt_tokens.inc(sum(len(s.prompt) for s in seqs))

    async def _events(self, request: Request, queue: asyncio.Queue, seqs: list[Sequence], poll: bool
                      ) -> AsyncIterator[tuple[int, str, Any]]:
        """The sequences' events until each is done; cancels them if the client leaves."""
        open_ = len(seqs)
        try:
            while open_:
                try:
                    ev = await asyncio.wait_for(queue.get(), 0.5) if poll else await queue.get()
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if ev[1] in ("done", "error"):
                    open_ -= 1
                yield ev
        finally:
            for s in seqs:
                s.cancel()

    # -- /v1/completions ------------------------------------------------------------------------
    async def completions(self, request: Request, req: CompletionRequest) -> Any:
        model, adapter = self._model(req.model)
        p = req.prompt
        prompts: list[str | list[int]] = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        encoded = []
        for q in prompts:
            ids = prompt_ids(self.tok, q, self.state.bos)
            self._check_ids(ids, "prompt")
            encoded.append(ids)
        k = req.logprobs
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        seqs = [Sequence(ids, self._cfg(req, req.max_tokens, len(ids), c), loop, queue, index=pi * req.n + c,
                         logprobs=k, prompt_logprobs=bool(req.echo) and k is not None, adapter=adapter)
                for pi, ids in enumerate(encoded) for c in range(req.n)]
        self._submit(seqs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo_text = [q if isinstance(q, str) else self.tok.decode(q) for q in prompts]
        n_prompt = sum(len(ids) for ids in encoded)
        head = {"id": rid, "object": "text_completion", "created": created, "model": model}
        as_ids = bool(req.return_tokens_as_token_ids)
        if req.stream:
            return self._stream(request, queue, seqs, head, n_prompt, req, as_ids, echo_text, prompts)
        choices = await self._drain(request, queue, seqs)
        out = []
        for s in seqs:
            ch = choices[s.index]
            text = "".join(ch.text)
            lp = None
            if k is not None:
                skip = self._skip(prompts[s.index // req.n])
                toks = (s.prompt_info[skip:] if req.echo else []) + ch.tokens
                ids = (s.prompt[skip:] if req.echo else []) + [t.token for t in ch.tokens]
                lp = self._completion_logprobs(ids, toks, as_ids, len(echo_text[s.index // req.n]) if req.echo else 0)
            out.append({"index": s.index, "text": (echo_text[s.index // req.n] if req.echo else "") + text,
                        "logprobs": lp, "finish_reason": ch.finish})
        return JSONResponse({**head, "choices": out, "usage": self._usage(n_prompt, choices)})

    def _skip(self, prompt: str | list[int]) -> int:
        """Echoed prompt tokens start after the BOS we put before a text prompt (it is not in the text)."""
        return len(self.state.bos) if isinstance(prompt, str) and prompt else 0

    def _token_str(self, t: int, as_ids: bool) -> str:
        return f"token_id:{t}" if as_ids else self.tok.decode([t], skip_special=False)

    def _completion_logprobs(self, ids: list[int], infos: list[TokenInfo | None], as_ids: bool, echo_len: int
                             ) -> dict[str, Any]:
        tokens = [self._token_str(t, as_ids) for t in ids]
        offsets, at = [], 0
        for s in tokens:
            offsets.append(at)
            at += len(s)
        return {"tokens": tokens,
                "token_logprobs": [None if i is None else i.logprob for i in infos],
                "top_logprobs": [None if i is None else {self._token_str(t, as_ids): lp for t, lp in i.top}
                                 for i in infos],
                "text_offset": offsets}

    @staticmethod
    def _usage(n_prompt: int, choices: dict[int, Choice]) -> dict[str, int]:
        n_new = sum(c.n_new for c in choices.values())
        return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}

    async def _drain(self, request: Request, queue: asyncio.Queue, seqs: list[Sequence]) -> dict[int, Choice]:
        choices = {s.index: Choice() for s in seqs}
        async for i, kind, value in self._events(request, queue, seqs, poll=True):
            self._apply(choices[i], kind, value)
        self._count(choices)
        return choices

    def _count(self, choices: dict[int, Choice]) -> None:
        self.state.metrics.completion_tokens.inc(sum(c.n_new for c in choices.values()))

    @staticmethod
    def _apply(ch: Choice, kind: str, value: Any) -> None:
        if kind == "token":
            piece: Piece = value
            ch.text.append(piece.text)
            if piece.info.token >= 0:
                ch.tokens.append(piece.info)
                ch.n_new += 1
        elif kind == "done":
            ch.finish = value
        else:
            raise ApiError(500, value, type="server_error")

    def _stream(self, request: Request, queue: asyncio.Queue, seqs: list[Sequence], head: dict, n_prompt: int,
                req: Any, as_ids: bool, echo_text: list[str] | None = None, prompts: list | None = None,
                chat: bool = False) -> StreamingResponse:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        k = (req.top_logprobs or 0) if chat and req.logprobs else (None if chat else req.logprobs)

        async def body() -> AsyncIterator[str]:
            choices = {s.index: Choice() for s in seqs}
            if chat:
                for s in seqs:
                    yield _sse({**head, "choices": [{"index": s.index, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
            elif req.echo:
                for s in seqs:
                    skip = self._skip(prompts[s.index // req.n])
                    lp = self._completion_logprobs(s.prompt[skip:], s.prompt_info[skip:], as_ids, 0) \
                        if k is not None else None
                    yield _sse({**head, "choices": [{"index": s.index, "text": echo_text[s.index // req.n],
                                                     "logprobs": lp, "finish_reason": None}]})
            try:
                async for i, kind, value in self._events(request, queue, seqs, poll=False):
                    ch = choices[i]
                    if kind == "error":
                        yield _sse(ApiError(500, value, type="server_error").body())
                        break
                    self._apply(ch, kind, value)
                    piece = value if kind == "token" else Piece("", TokenInfo(-1))
                    real = piece.info.token >= 0
                    if kind == "token" and not piece.text and not (k is not None and real):
                        continue  # nothing printable yet and no logprob to report
                    lp = None
                    if k is not None and real:
                        lp = self._chat_logprobs([piece.info], as_ids) if chat else \
                            self._completion_logprobs([piece.info.token], [piece.info], as_ids, 0)
                    finish = value if kind == "done" else None
                    if chat:
                        delta = {"content": piece.text} if kind == "token" else {}
                        c = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
                    else:
                        c = {"index": i, "text": piece.text, "logprobs": lp, "finish_reason": finish}
                    yield _sse({**head, "choices": [c]})
            finally:
                self._count(choices)
            if include_usage:
                yield _sse({**head, "choices": [], "usage": self._usage(n_prompt, choices)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- /v1/chat/completions -------------------------------------------------------------------
    def _chat_logprobs(self, infos: list[TokenInfo], as_ids: bool) -> dict[str, Any]:
        def entry(t: int, lp: float) -> dict[str, Any]:
            s = self._token_str(t, as_ids)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {"content": [{**entry(i.token, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top]}
                            for i in infos]}

    async def chat(self, request: Request, req: ChatRequest) -> Any:
        model, adapter = self._model(req.model)
        if self.state.chat_template is None:
            raise ApiError(400, f"the model '{self.state.model_name}' has no chat template; use /v1/completions",
                           param="messages", code="no_chat_template")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            text = self.state.chat_template.render(messages, add_generation_prompt=True)
        except Exception as e:  # a template may raise on a conversation it does not support
            raise ApiError(400, f"the chat template refused these messages: {e}", param="messages") from None
        ids = self.tok.encode(text, allow_special=True)
        bos = self.state.bos
        ids = ids if ids[:len(bos)] == bos else bos + ids  # one BOS (lmlab/serve/chat.py)
        self._check_ids(ids, "messages")
        k = (req.top_logprobs or 0) if req.logprobs else None
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        max_tokens = req.max_completion_tokens or req.max_tokens
        seqs = [Sequence(ids, self._cfg(req, max_tokens, len(ids), c), loop, queue, index=c, logprobs=k,
                         adapter=adapter) for c in range(req.n)]
        self._submit(seqs)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model}
        if req.stream:
            return self._stream(request, queue, seqs, {**head, "object": "chat.completion.chunk"}, len(ids), req,
                                 False, chat=True)
        choices = await self._drain(request, queue, seqs)
        out = [{"index": i, "message": {"role": "assistant", "content": "".join(ch.text)},
                "logprobs": self._chat_logprobs(ch.tokens, False) if k is not None else None,
                "finish_reason": ch.finish} for i, ch in sorted(choices.items())]
        return JSONResponse({**head, "choices": out, "usage": self._usage(len(ids), choices)})


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
