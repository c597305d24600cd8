"""The engine loop: add requests, step (schedule -> run -> sample), stream outputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cache.slot_table import SlotTable
from ..cache.state_cache import HybridCache
from ..sampling.params import SamplingParams
from ..sampling.sampler import sample, token_logprobs
from ..tokenizer import Tokenizer, load_tokenizer
from ..weights.loader import load_model
from .batch import Segment
from .model_runner import ModelRunner
from .scheduler import Scheduler
from .sequence import Sequence, Status

log = logging.getLogger("deltaserve")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated so far
    new_token_ids: list[int]  # generated in this step
    finished: bool
    finish_reason: str | None
    text: str | None = None
    prompt_logits: torch.Tensor | None = None  # [P - from, V] when asked for; row i predicts prompt token from+i+1
    logits: torch.Tensor | None = None  # [len(token_ids), V] when kept: the logits each token was sampled from
    logprobs: list[tuple[float, dict[int, float]]] | None = None  # per token: (its logprob, top-k {id: logprob})


@dataclass
class EngineStats:
    steps: int = 0
    tokens: int = 0  # tokens run through the model
    prompt_tokens: int = 0
    generated_tokens: int = 0
    last_batch_seqs: int = 0
    max_batch_seqs: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> count


class LLMEngine:
    def __init__(self, model, cfg, tokenizer: Tokenizer | None = None, *, max_num_seqs: int = 16,
                 max_model_len: int = 4096, max_num_batched_tokens: int | None = None,
                 extra_state_slots: int = 0, device: str | torch.device = "cpu"):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.device = torch.device(device)
        self.max_model_len = max_model_len
        dtype = model.embed.weight.dtype
        self.cache = HybridCache(cfg, max_num_seqs, max_model_len, dtype, self.device, extra_state_slots)
        log.info("%d slots x %d tokens: %s", max_num_seqs, max_model_len, self.cache.size.describe())
        self.runner = ModelRunner(model, self.cache, self.device)
        self.scheduler = Scheduler(SlotTable(max_num_seqs), max_num_batched_tokens or max(2048, max_num_seqs))
        self.requests: dict[str, Sequence] = {}
        self.stats = EngineStats()

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", dtype: str = "auto", **kwargs) -> "LLMEngine":
        torch_dtype = _resolve_dtype(path, dtype)
        model, cfg = load_model(path, torch_dtype, device)
        return cls(model, cfg, load_tokenizer(path), device=device, **kwargs)

    def memory_report(self) -> str:
        return self.cache.size.describe()

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    keep_logits: bool = False, prompt_logits_from: int | None = None) -> None:
        """Queues a request. keep_logits: return the logits each output token was sampled from;
        prompt_logits_from: return the logits of prompt positions >= this (0 = all, for scoring)."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt = list(prompt_token_ids)
        if not prompt:
            raise ValueError("prompt is empty")
        if bad := [t for t in prompt if not (isinstance(t, int) and 0 <= t < self.cfg.vocab_size)]:
            raise ValueError(f"prompt token ids out of range [0, {self.cfg.vocab_size}): {bad[:5]}")
        room = self.max_model_len - len(prompt)
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if room < max(max_tokens, 1 if params.max_tokens is None else 0):
            raise ValueError(f"request needs {len(prompt)} prompt + {max_tokens} new tokens, "
                             f"but max_model_len is {self.max_model_len}")
        if prompt_logits_from is not None and not 0 <= prompt_logits_from < len(prompt):
            raise ValueError(f"prompt_logits_from must be in [0, {len(prompt)}), got {prompt_logits_from}")
        seq = Sequence(request_id, prompt, params, max_tokens, keep_logits, prompt_logits_from)
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        seq = self.requests.pop(request_id, None)
        if seq is not None and seq.status is not Status.FINISHED:
            self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if not plan:
            return []
        segments = [Segment(seq.next_tokens(n), seq.num_computed, seq.slot, seq.logits_wanted(n)) for seq, n in plan]
        logits = self.runner.run(segments)
        self._count(plan)
        to_sample: list[tuple[Sequence, torch.Tensor]] = []
        outputs = []
        for (seq, n), seg_logits in zip(plan, logits):
            was_prefill = seq.in_prefill
            seq.num_computed += n
            if was_prefill and seq.prompt_logits_from is not None:
                seq.prompt_logits.append(seg_logits)  # rows for this chunk's positions >= prompt_logits_from
            if seq.in_prefill:
                continue
            if len(seq.output_ids) >= seq.max_tokens:  # prefill-only request (max_tokens == 0)
                self._finish(seq, "length")
                outputs.append(self._output(seq, 0))
            else:
                to_sample.append((seq, seg_logits[-1]))
        if to_sample:
            rows = torch.stack([lg for _, lg in to_sample])
            tokens = sample(rows, [s.params for s, _ in to_sample], [s.generator for s, _ in to_sample])
            for (seq, row), tok in zip(to_sample, tokens):
                seq.output_ids.append(tok)
                if seq.keep_logits:
                    seq.output_logits.append(row)
                if seq.params.logprobs is not None:
                    seq.logprobs.append(token_logprobs(row, tok, seq.params.logprobs))
                self.stats.generated_tokens += 1
                reason = self._stop_reason(seq, tok)
                if reason:
                    self._finish(seq, reason)
                outputs.append(self._output(seq, 1))
        return outputs

    # ---------------------------------------------------------------- helpers ----

    def _count(self, plan) -> None:
        st = self.stats
        st.steps += 1
        st.tokens += sum(n for _, n in plan)
        st.prompt_tokens += sum(n for s, n in plan if s.in_prefill)
        st.last_batch_seqs = len(plan)
        st.max_batch_seqs = max(st.max_batch_seqs, len(plan))

    def _stop_reason(self, seq: Sequence, tok: int) -> str | None:
        if tok in seq.params.stop_token_ids or (not seq.params.ignore_eos and tok in self.cfg.eos_token_ids):
            return "stop"
        if len(seq.output_ids) >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.requests.pop(seq.request_id, None)
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1

    def _output(self, seq: Sequence, new: int) -> RequestOutput:
        done = seq.status is Status.FINISHED
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_ids,
            token_ids=list(seq.output_ids),
            new_token_ids=seq.output_ids[len(seq.output_ids) - new:],
            finished=done,
            finish_reason=seq.finish_reason,
            text=self.tokenizer.decode(seq.output_ids) if self.tokenizer and done else None,
            prompt_logits=torch.cat(seq.prompt_logits) if done and seq.prompt_logits else None,
            logits=torch.stack(seq.output_logits) if done and seq.output_logits else None,
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
        )


def _resolve_dtype(path: str | Path, dtype: str) -> torch.dtype:
    if dtype == "auto":
        import json
        raw = json.loads((Path(path) / "config.json").read_text())
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]
