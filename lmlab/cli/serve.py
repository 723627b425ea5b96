"""`lmlab serve MODEL`: an OpenAI-compatible HTTP server with continuous batching (lmlab/serve/)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from lmlab.cli._args import add_precision
from lmlab.errors import LmlabError

log = logging.getLogger("lmlab.cli")


def _api_key(args: argparse.Namespace) -> str | None:
    """From $LMLAB_API_KEY or --api-key-file: a key given as a flag would show in `ps`."""
    if args.api_key_file:
        key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        if not key:
            raise LmlabError(f"{args.api_key_file} is empty")
        return key
    return os.environ.get("LMLAB_API_KEY") or None


def run(args: argparse.Namespace, rest: list[str]) -> int:
    import torch

    from lmlab.io.load import load_model
    from lmlab.serve.app import ServeConfig, check_servable, create_app, run_server

    if args.max_batch < 1 or args.max_len < 2 or args.max_queue < 1 or args.shutdown_grace < 0:
        raise LmlabError("--max-batch, --max-queue must be at least 1, --max-len at least 2 and "
                         "--shutdown-grace not negative")
    key = _api_key(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, precision=args.precision)
    check_servable(loaded)
    cfg = ServeConfig(api_key=key, model_name=args.served_model_name, max_batch=args.max_batch,
                      max_len=args.max_len, max_queue=args.max_queue, max_body=args.max_body,
                      lora_modules=args.lora_modules)
    app = create_app(loaded, cfg)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not key:
        log.warning(f"serving on {args.host} without an API key: anyone who reaches this port can use the model")
    log.info(f"serving {loaded.name} on http://{args.host}:{args.port} (batch {cfg.max_batch}, context "
             f"{app.app.state.lmlab.scheduler.max_len}, key {'on' if key else 'off'})")
    run_server(app, host=args.host, port=args.port, grace=args.shutdown_grace, max_connections=args.max_connections)
    return 0


def add_parser(add) -> None:
    sp = add("serve", run, "Serve a causal model over an OpenAI-compatible HTTP API (with a chat page at /).",
             "examples:\n  lmlab serve SmolLM2-135M-Instruct.Q4_1.gguf            http://127.0.0.1:8000/\n"
             "  LMLAB_API_KEY=secret lmlab serve runs/<run> --port 8080 --max-batch 32\n"
             "  lmlab serve model.gguf --lora-modules sql=adapters/sql poems=adapters/poems   (by model name)\n"
             "the API key comes from $LMLAB_API_KEY or --api-key-file (never a flag: it would show in ps)")
    sp.add_argument("model", metavar="MODEL", help="run directory, checkpoint, .gguf file or HF directory")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--api-key-file", help="a file holding the API key (default: $LMLAB_API_KEY, else no key)")
    sp.add_argument("--served-model-name", help="the model's name in the API (default: the file's name)")
    sp.add_argument("--lora-modules", nargs="+", action="extend", default=[], metavar="NAME=PATH",
                    help="PEFT LoRA adapters of this model, each served as model NAME beside the base (as "
                         "vLLM's flag; repeatable); requests of different adapters share the decode batch")
    sp.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (KV cache rows)")
    sp.add_argument("--max-len", type=int, default=2048, help="context per sequence, prompt + completion")
    sp.add_argument("--max-queue", type=int, default=256, help="waiting sequences before answering 503")
    sp.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes")
    sp.add_argument("--max-connections", type=int, default=1024, help="open connections before answering 503")
    sp.add_argument("--shutdown-grace", type=float, default=30.0,
                    help="seconds in-flight requests may run on after SIGTERM before they end with "
                         "finish_reason 'abort' (new connections are refused at once)")
    sp.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    add_precision(sp)
