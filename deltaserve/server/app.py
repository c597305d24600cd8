"""The FastAPI app: routes, API-key check, and every error turned into an OpenAI error body.

The engine thread starts with the app (lifespan) and loads the model there: /health answers 503
until it is ready. On shutdown uvicorn first lets in-flight responses finish (up to its graceful
timeout, then cancels them, which aborts their engine requests); then the engine loop fails whatever
is left with a 503 and its thread is joined.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..cache.state_cache import KV_BLOCK
from ..engine.llm_engine import LLMEngine
from ..tokenizer import load_tokenizer
from .chat_template import ChatTemplate
from .engine_loop import EngineLoop
from .handlers import ClientGone, ServerContext, create_chat_completion, create_completion
from .metrics import CONTENT_TYPE, render_metrics
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, parse_request

MAX_BODY_BYTES = 16 * 2**20


@dataclass(frozen=True)
class ServerConfig:
    model: str | Path
    served_model_name: str | None = None  # None: the checkpoint directory's name
    api_key: str | None = None
    max_num_seqs: int = 8
    max_model_len: int = 4096
    max_queue: int = 256  # accepted requests waiting for a slot, beyond which 429
    max_num_batched_tokens: int | None = None
    device: str = "cpu"
    dtype: str = "auto"
    spec_tokens: int = 0  # MTP speculative decoding: drafts per step
    overlap_decode: bool | None = None  # decode steps launched before the last one's tokens are read (None: CUDA)
    tensor_parallel_size: int = 1  # processes the model is split over
    enable_prefix_caching: bool = True  # reuse earlier requests' KV blocks and state snapshots
    prefix_cache_slots: int | None = None  # snapshots kept (None: the engine's default)
    kv_cache_tokens: int | None = None  # positions the paged KV pool holds (None: max_num_seqs x max_model_len)

    def engine_options(self) -> dict:
        """The LLMEngine options this configuration sets."""
        return dict(max_num_seqs=self.max_num_seqs, max_model_len=self.max_model_len,
                    max_num_batched_tokens=self.max_num_batched_tokens, spec_tokens=self.spec_tokens,
                    overlap_decode=self.overlap_decode, enable_prefix_caching=self.enable_prefix_caching,
                    prefix_cache_slots=self.prefix_cache_slots,
                    num_kv_blocks=None if self.kv_cache_tokens is None else -(-self.kv_cache_tokens // KV_BLOCK))

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).resolve().name


def create_app(config: ServerConfig, make_engine: Callable[[], LLMEngine] | None = None,
               on_load_failure: Callable[[str], None] | None = None) -> FastAPI:
    """make_engine (default: load config.model) runs on the engine thread; tests pass their own."""
    if make_engine is None:
        def make_engine() -> LLMEngine:
            return LLMEngine.from_pretrained(config.model, device=config.device, dtype=config.dtype,
                                             tensor_parallel_size=config.tensor_parallel_size,
                                             **config.engine_options())
    engine = EngineLoop(make_engine, config.max_queue, on_load_failure)
    tokenizer = load_tokenizer(config.model)
    if Path(config.model).is_dir():
        template = ChatTemplate.from_dir(config.model)
    else:  # a GGUF file carries its chat template in its metadata
        template = ChatTemplate(tokenizer.chat_template) if tokenizer and tokenizer.chat_template else None
    ctx = ServerContext(engine, tokenizer, template, config.model_name)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="deltaserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    _add_error_handlers(app)
    auth = [Depends(_auth_check(config.api_key))]

    @app.get("/health")
    async def health() -> Response:
        if engine.state == "ready":
            return JSONResponse({"status": "ok"})
        return JSONResponse(ApiError(503, f"server not ready: {engine.state}" + (f" ({engine.error})" if engine.error
                                     else ""), type="server_error", code="not_ready").body(), status_code=503)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> Response:
        max_len = engine.info.max_model_len if engine.info else config.max_model_len
        return JSONResponse(ModelList(data=[ModelCard(id=ctx.model_name, max_model_len=max_len)]).model_dump())

    @app.get("/metrics", dependencies=auth)
    async def metrics() -> Response:
        text = render_metrics(ctx.model_name, engine.state, engine.snapshot, engine.info)
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        return await create_completion(ctx, parse_request(CompletionRequest, await _body(request)), request)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(ctx, parse_request(ChatCompletionRequest, await _body(request)), request)

    return app


async def _body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {MAX_BODY_BYTES}", code="body_too_large")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body is over the limit of {MAX_BODY_BYTES} bytes", code="body_too_large")
    return body


def _auth_check(api_key: str | None) -> Callable[[Request], None]:
    expected = f"Bearer {api_key}".encode() if api_key else None

    def check(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if expected is not None and not secrets.compare_digest(given, expected):
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
    return check


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> Response:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> Response:  # unknown route (404), wrong method (405)
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code,
                            headers=e.headers)

    @app.exception_handler(Exception)
    async def bug(_: Request, e: Exception) -> Response:  # still logged by Starlette; the client gets a JSON body
        return JSONResponse(ApiError(500, f"internal server error: {type(e).__name__}", type="server_error").body(),
                            status_code=500)

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)  # gone while we read the body
    async def client_gone(_: Request, __: Exception) -> Response:
        return Response(status_code=499)  # nobody reads it; any engine requests are already aborted
