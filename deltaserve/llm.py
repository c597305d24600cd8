"""The offline entry point: LLM(path).generate(...) and .score(...)."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from .engine.llm_engine import LLMEngine
from .engine.outputs import RequestOutput
from .sampling.params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | Path, device: str = "cpu", dtype: str = "auto", max_num_seqs: int = 16,
                 max_model_len: int = 4096, max_num_batched_tokens: int | None = None, **engine_options):
        """engine_options: the other LLMEngine options (spec_tokens, overlap_decode, extra_state_slots,
        tensor_parallel_size, enable_prefix_caching, prefix_cache_slots, num_kv_blocks, prefill_graphs)."""
        self.engine = LLMEngine.from_pretrained(
            model, device=device, dtype=dtype, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
            max_num_batched_tokens=max_num_batched_tokens, **engine_options,
        )
        self._ids = itertools.count()

    def _token_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.engine.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json: pass token ids instead of text")
            return self.engine.tokenizer.encode(prompt)
        return list(prompt)

    def generate(self, prompts: Prompt | list[Prompt],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Runs all prompts concurrently; returns one finished output per prompt, in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        return self._run([(self._token_ids(p), sp, None) for p, sp in zip(prompts, plist)])

    def score(self, prompts: list[Prompt]) -> list[torch.Tensor]:
        """Logits of every prompt position ([T_i, V] float32), all sequences run concurrently."""
        outs = self._run([(self._token_ids(p), SamplingParams(max_tokens=0), 0) for p in prompts])
        return [o.prompt_logits for o in outs]

    def _run(self, requests: list[tuple[list[int], SamplingParams, int | None]]) -> list[RequestOutput]:
        """requests: (token ids, params, prompt_logits_from)."""
        ids = [f"llm-{next(self._ids)}" for _ in requests]
        try:
            for rid, (tokens, sp, logits_from) in zip(ids, requests):
                self.engine.add_request(rid, tokens, sp, prompt_logits_from=logits_from)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[rid] for rid in ids]
