"""`lmlab serve`: one causal model behind an OpenAI-compatible HTTP API (FastAPI on uvicorn).

    GET  /health                 liveness (never needs the key)
    GET  /metrics                Prometheus text
    GET  /v1/models              the model served, and its LoRA adapters by name
    POST /v1/completions         text or token-id prompts, echo + logprobs (what lm-eval sends)
    POST /v1/chat/completions    the model's own chat template
    GET  /tokenizer_info, POST /tokenize, /detokenize   vLLM's tokenizer routes (lm-eval's remote tokenizer)
    GET  /                       the chat page (lmlab/serve/static/index.html)

Model work happens on the scheduler's thread (lmlab/serve/scheduler.py); see docs/serve/README.md.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from lmlab.errors import LmlabError
from lmlab.serve.adapters import attach_adapters, parse_lora_modules
from lmlab.serve.api import Api
from lmlab.serve.http import Guard, error_response, read_json
from lmlab.serve.metrics import CONTENT_TYPE, Metrics
from lmlab.serve.protocol import ApiError, ChatRequest, CompletionRequest, parse
from lmlab.serve.scheduler import Scheduler

STATIC = Path(__file__).parent / "static"


@dataclass(kw_only=True)
class ServeConfig:
    api_key: str | None = None
    model_name: str | None = None     # default: the model file's or directory's name
    max_batch: int = 16               # rows of the decode batch (and of the preallocated KV cache)
    max_len: int = 2048               # context per row, prompt + completion (capped at the model's)
    max_queue: int = 256              # sequences waiting for a row; more: 503 + Retry-After
    max_body: int = 1 << 20           # bytes of a request body (1 MiB)
    lora_modules: list[str] = field(default_factory=list)  # NAME=PATH: PEFT adapters served by name


def check_servable(loaded: Any) -> None:
    """Only causal LMs with a KV cache and a tokenizer decode here; say why anything else cannot."""
    if loaded.kind == "arpa":
        raise LmlabError(f"'{loaded.name}' is an n-gram model (ARPA); lmlab serve serves causal neural LMs")
    model = loaded.model
    if hasattr(model, "cross_kv"):
        raise LmlabError(f"'{loaded.name}' is an encoder-decoder; lmlab serve serves causal LMs "
                         "(try lmlab generate)")
    if loaded.objective != "causal" or loaded.tokenizer is None or not hasattr(model, "make_kv_cache"):
        raise LmlabError(f"'{loaded.name}' is not a causal LM with a KV cache and a tokenizer; lmlab serve "
                         "cannot serve it" + (" (try lmlab fill-mask)" if loaded.objective == "mlm" else ""))


class ServerState:
    def __init__(self, loaded: Any, cfg: ServeConfig):
        from lmlab.tokenizers.chat_template import chat_template_for

        check_servable(loaded)
        self.loaded, self.cfg = loaded, cfg
        self.tokenizer, self.bos = loaded.tokenizer, list(loaded.bos)
        self.model_name = cfg.model_name or loaded.name
        self.vocab_size = min(loaded.tokenizer.vocab_size, loaded.model.config.vocab_size)
        try:
            self.chat_template = chat_template_for(loaded.tokenizer)
        except LmlabError:
            self.chat_template = None
        self.adapter_paths = parse_lora_modules(cfg.lora_modules, self.model_name)
        self.adapters, rows = attach_adapters(loaded.model, self.adapter_paths)  # name -> row index (base 0)
        self.metrics = Metrics()
        self.scheduler = Scheduler(loaded.model, loaded.tokenizer, max_batch=cfg.max_batch, max_len=cfg.max_len,
                                   max_queue=cfg.max_queue, metrics=self.metrics, adapters=rows)
        self.started = int(time.time())


def create_app(loaded: Any, cfg: ServeConfig | None = None) -> Any:
    """The ASGI app (the API key guard around FastAPI); its lifespan starts and stops the scheduler."""
    cfg = cfg or ServeConfig()
    state = ServerState(loaded, cfg)
    api = Api(state)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.scheduler.start()
        yield
        state.scheduler.stop()

    app = FastAPI(title="lmlab serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.lmlab = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
        return error_response(ApiError(err.status_code, str(err.detail), headers=getattr(err, "headers", None)))

    @app.exception_handler(Exception)
    async def _crash(request: Request, err: Exception) -> JSONResponse:
        return error_response(ApiError(500, f"internal error: {type(err).__name__}", type="server_error"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        # vLLM's cards: an adapter's root is its path and its parent the base model
        card = {"object": "model", "created": state.started, "owned_by": "lmlab",
                "max_model_len": state.scheduler.max_len}
        return {"object": "list", "data": [
            {"id": state.model_name, **card, "root": state.model_name, "parent": None},
            *({"id": name, **card, "root": str(path), "parent": state.model_name}
              for name, path in state.adapter_paths.items())]}

    async def timed(request: Request, schema: type, handler) -> Any:
        """Parse the body as `schema`, run `handler`, and record the request's latency."""
        t0 = time.monotonic()
        req = parse(schema, await read_json(request, cfg.max_body))
        try:
            return await handler(request, req)
        finally:
            state.metrics.latency.observe(time.monotonic() - t0)

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request) -> Any:
        return await timed(request, CompletionRequest, api.completions)

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatRequest))
    async def chat(request: Request) -> Any:
        return await timed(request, ChatRequest, api.chat)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        sp = state.tokenizer.specials
        return {"eos_token": sp.eos, "bos_token": sp.bos, "pad_token": sp.pad,
                "chat_template": getattr(state.tokenizer, "chat_template", None),
                "model_max_length": state.scheduler.max_len}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await read_json(request, cfg.max_body)
        text = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(text, str):
            raise ApiError(400, "'prompt' must be a string", param="prompt")
        ids = state.tokenizer.encode(text)
        if body.get("add_special_tokens", True) is True:
            ids = state.bos + ids
        return {"tokens": ids, "count": len(ids), "max_model_len": state.scheduler.max_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body = await read_json(request, cfg.max_body)
        ids = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < state.vocab_size for t in ids):
            raise ApiError(400, "'tokens' must be a list of token ids in the vocabulary", param="tokens")
        return {"prompt": state.tokenizer.decode(ids)}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    _openapi(app)
    return Guard(app, api_key=cfg.api_key, metrics=state.metrics)


def _body_schema(model: Any) -> dict:
    """The request body's JSON schema for the OpenAPI document (we read the body ourselves, to bound
    its size while reading it and to answer every error in OpenAI's shape)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)  # they go into components/schemas (`_openapi`)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _openapi(app: FastAPI) -> None:
    """FastAPI's OpenAPI document, plus the request models' nested schemas under components/schemas."""
    from fastapi.openapi.utils import get_openapi

    def build() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for m in (CompletionRequest, ChatRequest):
                schemas.update(m.model_json_schema(ref_template="#/components/schemas/{model}").get("$defs", {}))
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = build


def run_server(app: Any, *, host: str, port: int, grace: float = 30.0, max_connections: int = 1024) -> None:
    """Serve `app` (from create_app) until SIGTERM or SIGINT, then shut down gracefully: the listening
    socket closes at once (new connections are refused), in-flight requests run on for up to `grace`
    seconds, then whatever is still decoding ends with finish_reason "abort" (a complete response, not a
    cut connection), and the call returns, so `lmlab serve` exits 0 after a SIGTERM."""
    import signal

    import uvicorn

    scheduler = app.app.state.lmlab.scheduler

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            import asyncio

            # at the end of the grace period, end the sequences so their responses finish cleanly;
            # uvicorn cancels tasks still open 5 s after that (a client that stopped reading)
            asyncio.get_running_loop().call_later(grace, scheduler.stop, None)
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace + 5,
                            limit_concurrency=max_connections, timeout_keep_alive=5)
    # uvicorn re-raises the signal it caught once it has shut down; with the default SIGTERM handler
    # that kills the process (exit -15) after a clean shutdown. A handler of ours makes that a no-op.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
