"""`deltaserve serve`: its command-line arguments, and run_server, which runs uvicorn until Ctrl-C.

Shutdown (Ctrl-C, SIGTERM): new requests get 503, in-flight ones have GRACEFUL_TIMEOUT_S to finish;
then the engine loop ends the rest with a 503 error (an SSE error event and [DONE] for streams), so
every client gets a well-formed answer, and the engine thread is joined.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
from pathlib import Path

import uvicorn

from ..models import DEFAULT_MODEL
from .app import ServerConfig, create_app
from .engine_loop import EngineLoop

log = logging.getLogger("deltaserve.server")

GRACEFUL_TIMEOUT_S = 30.0  # on Ctrl-C, in-flight responses get this long to finish before they are cancelled


class DrainingServer(uvicorn.Server):
    """uvicorn, whose shutdown first drains the engine loop and after grace_s cancels what is left."""

    def __init__(self, config: uvicorn.Config, engine: EngineLoop, grace_s: float = GRACEFUL_TIMEOUT_S):
        config.timeout_graceful_shutdown = grace_s + 5  # uvicorn's own hard stop, only if ours did not work
        super().__init__(config)
        self.engine, self.grace_s = engine, grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.engine.drain()
        timer = asyncio.get_running_loop().call_later(self.grace_s, self.engine.stop, 0)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def run_server(model_path: str | Path, host: str = "127.0.0.1", port: int = 8080, max_num_seqs: int = 8,
               api_key: str | None = None, max_model_len: int = 4096, max_queue: int = 256, device: str = "cpu",
               dtype: str = "auto", served_model_name: str | None = None, graceful_timeout: float = GRACEFUL_TIMEOUT_S,
               log_level: str = "info", spec_tokens: int = 0, tensor_parallel_size: int = 1,
               enable_prefix_caching: bool = True, prefix_cache_slots: int | None = None,
               kv_cache_tokens: int | None = None) -> None:
    """Serves the OpenAI API until interrupted; raises RuntimeError if the model fails to load."""
    config = ServerConfig(model_path, served_model_name, api_key, max_num_seqs, max_model_len, max_queue,
                          device=device, dtype=dtype, spec_tokens=spec_tokens,
                          tensor_parallel_size=tensor_parallel_size, enable_prefix_caching=enable_prefix_caching,
                          prefix_cache_slots=prefix_cache_slots, kv_cache_tokens=kv_cache_tokens)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")  # no-op if set up
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model", host)
    server: uvicorn.Server | None = None

    def stop_on_failure(_: str) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(config, on_load_failure=stop_on_failure)
    engine = app.state.ctx.engine
    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level), engine, graceful_timeout)
    server.run()
    engine.stop()  # already stopped by the lifespan, unless uvicorn was forced to quit
    if engine.state == "failed":
        raise RuntimeError(f"model failed to load: {engine.error}")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", default=str(DEFAULT_MODEL),
                        help="checkpoint directory (config.json, safetensors, tokenizer.json, chat template) or "
                             ".gguf file (default: the embedded model)")
    parser.add_argument("-np", "--parallel", dest="max_num_seqs", type=int, default=8,
                        help="parallel slots: sequences decoded together (default 8)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-key", default=os.environ.get("DELTASERVE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $DELTASERVE_API_KEY, else no key)")
    parser.add_argument("--max-model-len", type=int, default=4096, help="context length per slot (default 4096)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests that may wait for a slot before new ones get 429 (default 256)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--spec-tokens", type=int, default=0,
                        help="MTP speculative decoding: draft tokens per step (0 = off; needs mtp.* weights)")
    parser.add_argument("-tp", "--tensor-parallel-size", type=int, default=1,
                        help="processes the model is split over by heads (gloo on the CPU, NCCL on CUDA)")
    add_prefix_cache_args(parser)
    parser.add_argument("--served-model-name", default=None, help="model id in the API (default: directory name)")
    parser.add_argument("--graceful-timeout", type=float, default=GRACEFUL_TIMEOUT_S,
                        help="on shutdown, seconds in-flight requests get to finish before they are cancelled")


def add_prefix_cache_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="recompute every prompt (default: reuse cached KV blocks and recurrent-state snapshots "
                             "of earlier requests' prefixes, e.g. a chat's earlier turns)")
    parser.add_argument("--prefix-cache-slots", type=int, default=None,
                        help="recurrent-state snapshots the prefix cache keeps, each the size of one sequence's "
                             "state (default max(8, --parallel))")
    parser.add_argument("--kv-cache-tokens", type=int, default=None,
                        help="positions the paged KV cache holds, shared by all sequences (default --parallel x "
                             "--max-model-len); a request whose prompt + max_tokens cannot fit is refused")


def serve_from_args(args: argparse.Namespace) -> None:
    run_server(args.model, host=args.host, port=args.port, max_num_seqs=args.max_num_seqs, api_key=args.api_key,
               max_model_len=args.max_model_len, max_queue=args.max_queue, device=args.device, dtype=args.dtype,
               served_model_name=args.served_model_name, graceful_timeout=args.graceful_timeout,
               spec_tokens=args.spec_tokens, tensor_parallel_size=args.tensor_parallel_size,
               enable_prefix_caching=not args.no_prefix_cache, prefix_cache_slots=args.prefix_cache_slots,
               kv_cache_tokens=args.kv_cache_tokens)
