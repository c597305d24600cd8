"""/v1/completions and /v1/chat/completions: request -> token ids -> Generation -> JSON or SSE.

Streaming waits for the first delta before sending headers, so a request refused by the engine still
gets its own status code. Once streaming, a failure is sent as an SSE error event and the stream ends.
Usage is in every non-streaming response, and in the last chunk of every stream (a chunk of its own,
with no choices, when stream_options.include_usage asks for OpenAI's exact behaviour).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from ..sampling.params import SamplingParams
from ..tokenizer import Tokenizer
from .chat_template import ChatTemplate, ChatTemplateError
from .engine_loop import EngineInfo, EngineLoop
from .generation import ChoiceDelta, Generation, check_prompt
from .protocol import (
    ApiError, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
    ChatDelta, ChatLogprobs, ChatMessageOut, CompletionChoice, CompletionLogprobs, CompletionRequest,
    CompletionResponse, PromptTokensDetails, SamplingFields, TokenLogprob, TopLogprob, Usage,
)

T = TypeVar("T")


@dataclass
class ServerContext:
    engine: EngineLoop
    tokenizer: Tokenizer | None
    chat_template: ChatTemplate | None
    model_name: str

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer.json: send token ids as the prompt", param="prompt")
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer else ""


@dataclass
class _Acc:
    """One choice's deltas merged (non-streaming responses)."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, dict[int, float]]] | None = None
    offsets: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, d: ChoiceDelta) -> None:
        self.text += d.text
        self.token_ids += d.token_ids
        self.offsets += d.text_offsets
        if d.logprobs is not None:
            self.logprobs = self.logprobs or []
            self.logprobs += d.logprobs
        self.finish_reason = d.finish_reason or self.finish_reason

    def delta(self, index: int) -> ChoiceDelta:
        return ChoiceDelta(index, self.text, self.token_ids, self.logprobs, self.offsets, self.finish_reason)


async def create_completion(ctx: ServerContext, req: CompletionRequest, request: Request) -> Response:
    ctx.check_model(req.model)
    info = ctx.engine.ready_info()
    prompts = [ctx.encode(p) if isinstance(p, str) else list(p) for p in req.prompts]
    for prompt in prompts:
        check_prompt(prompt, req.max_tokens, info.vocab_size, info.max_model_len)
    rid = f"cmpl-{uuid.uuid4().hex}"
    gen = _generation(ctx, info, rid, prompts, req, req.max_tokens, req.logprobs)

    def choice(d: ChoiceDelta) -> CompletionChoice:
        return CompletionChoice(index=d.index, text=d.text, logprobs=_completion_logprobs(ctx, d),
                                finish_reason=d.finish_reason)

    def chunk(d: ChoiceDelta | None, usage: Usage | None) -> BaseModel:
        return CompletionResponse(id=rid, model=ctx.model_name, choices=[choice(d)] if d else [], usage=usage)

    if req.stream:
        return await _stream(gen, chunk, req, request)
    accs = await _collect(gen, request)
    return JSONResponse(CompletionResponse(id=rid, model=ctx.model_name, usage=_usage(gen),
                                           choices=[choice(a.delta(i)) for i, a in enumerate(accs)]).model_dump())


async def create_chat_completion(ctx: ServerContext, req: ChatCompletionRequest, request: Request) -> Response:
    ctx.check_model(req.model)
    info = ctx.engine.ready_info()
    if ctx.chat_template is None:
        raise ApiError(400, "this model has no chat template (tokenizer_config.json or chat_template.jinja): "
                            "use /v1/completions", param="messages")
    messages = [_message_dict(m.model_dump(exclude_unset=True)) for m in req.messages]
    try:
        text = ctx.chat_template.render(messages, add_generation_prompt=True, **(req.chat_template_kwargs or {}))
    except (ChatTemplateError, TypeError) as e:
        raise ApiError(400, str(e), param="messages") from None
    prompt = ctx.encode(text)
    check_prompt(prompt, req.max_new_tokens, info.vocab_size, info.max_model_len)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    gen = _generation(ctx, info, rid, [prompt], req, req.max_new_tokens, req.num_logprobs)
    started: set[int] = set()  # choices whose first chunk (carrying the role) went out

    def chunk(d: ChoiceDelta | None, usage: Usage | None) -> BaseModel:
        if d is None:
            return ChatCompletionChunk(id=rid, model=ctx.model_name, choices=[], usage=usage)
        role = None if d.index in started else "assistant"
        started.add(d.index)
        delta = ChatDelta(role=role, content=d.text if d.text or role else None)
        return ChatCompletionChunk(id=rid, model=ctx.model_name, usage=usage, choices=[ChatChunkChoice(
            index=d.index, delta=delta, logprobs=_chat_logprobs(ctx, d), finish_reason=d.finish_reason)])

    if req.stream:
        return await _stream(gen, chunk, req, request)
    accs = await _collect(gen, request)
    choices = [ChatChoice(index=i, message=ChatMessageOut(content=a.text), logprobs=_chat_logprobs(ctx, a.delta(i)),
                          finish_reason=a.finish_reason) for i, a in enumerate(accs)]
    return JSONResponse(ChatCompletionResponse(id=rid, model=ctx.model_name, choices=choices,
                                               usage=_usage(gen)).model_dump())


# --------------------------------------------------------------------------------------- plumbing ----

def _generation(ctx: ServerContext, info: EngineInfo, base_id: str, prompts: list[list[int]], req: SamplingFields,
                max_tokens: int | None, logprobs: int | None) -> Generation:
    stop_ids = list(req.stop_token_ids or [])
    if bad := [t for t in stop_ids if not 0 <= t < info.vocab_size]:
        raise ApiError(400, f"stop_token_ids must be in [0, {info.vocab_size}), got {bad[:5]}", param="stop_token_ids")
    params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_k=max(req.top_k, 0),
                            top_p=req.top_p, seed=req.seed, stop_token_ids=stop_ids, ignore_eos=req.ignore_eos,
                            logprobs=logprobs)
    return Generation(ctx.engine, ctx.decode, base_id, prompts, params, req.n, req.stop_strings)


def _message_dict(message: dict) -> dict:
    """Text parts are joined into one string, so templates that expect a string content work."""
    if isinstance(message.get("content"), list):
        message["content"] = "\n".join(part["text"] for part in message["content"])
    return message


def _usage(gen: Generation) -> Usage:
    done = gen.completion_tokens
    return Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=done, total_tokens=gen.prompt_tokens + done,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=gen.cached_tokens))


async def _collect(gen: Generation, request: Request) -> list[_Acc]:
    gen.start()
    accs: dict[int, _Acc] = {}

    async def run() -> None:
        async for d in gen.deltas():
            accs.setdefault(d.index, _Acc()).add(d)

    await _unless_disconnected(request, run())
    return [accs[i] for i in sorted(accs)]


async def _stream(gen: Generation, chunk: Callable[[ChoiceDelta | None, Usage | None], BaseModel],
                  req: SamplingFields, request: Request) -> Response:
    gen.start()
    deltas = gen.deltas()
    first = await _unless_disconnected(request, anext(deltas))
    separate_usage = bool(req.stream_options and req.stream_options.include_usage)
    num_choices = gen.num_choices

    async def events() -> AsyncIterator[str]:
        finished, d = 0, first
        try:
            while True:
                finished += d.finish_reason is not None
                last = finished == num_choices
                yield _sse(chunk(d, _usage(gen) if last and not separate_usage else None))
                if last:
                    break
                d = await anext(deltas)
            if separate_usage:
                yield _sse(chunk(None, _usage(gen)))
        except ApiError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            await deltas.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(model: BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"


class ClientGone(Exception):
    """The client closed the connection before the response began; its engine requests are aborted."""


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits work, cancelling it (and so aborting its engine requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if watch.done() and not watch.cancelled():
        await asyncio.wait({task})  # let the cancellation run the generator's cleanup (the engine aborts)
        raise ClientGone()
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _completion_logprobs(ctx: ServerContext, d: ChoiceDelta) -> CompletionLogprobs | None:
    if d.logprobs is None:
        return None
    return CompletionLogprobs(
        tokens=[ctx.decode([t]) for t in d.token_ids], token_logprobs=[lp for lp, _ in d.logprobs],
        top_logprobs=[{ctx.decode([t]): v for t, v in top.items()} for _, top in d.logprobs],
        text_offset=d.text_offsets)


def _chat_logprobs(ctx: ServerContext, d: ChoiceDelta) -> ChatLogprobs | None:
    if d.logprobs is None:
        return None

    def top(t: int, lp: float) -> TopLogprob:
        s = ctx.decode([t])
        return TopLogprob(token=s, logprob=lp, bytes=list(s.encode()))

    return ChatLogprobs(content=[
        TokenLogprob(**top(t, lp).model_dump(), top_logprobs=[top(i, v) for i, v in alts.items()])
        for t, (lp, alts) in zip(d.token_ids, d.logprobs)])
