"""The engine loop: add requests, step (schedule -> run -> sample), stream outputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cache.slot_table import SlotTable
from ..cache.state_cache import HybridCache
from ..sampling.params import SamplingParams
from ..sampling.sampler import sample, sampled_rows, token_logprobs
from ..tokenizer import Tokenizer, load_tokenizer
from ..parallel.shard import shard_config
from ..parallel.workers import MirroredRunner, start_group
from ..weights.loader import load_model, open_checkpoint, resolve_dtype
from ..forward_batch import Segment
from .kv_manager import KVManager
from .model_runner import ModelRunner
from .outputs import EngineStats, RequestOutput
from .scheduler import Scheduler, prefill_grid
from .sequence import Sequence, Status
from .speculative import MTPDrafter, accept
from .step_tokens import StepTokens

log = logging.getLogger("deltaserve")


@dataclass
class InFlight:
    seqs: list[Sequence]  # row order of the step
    tokens: StepTokens


class LLMEngine:
    def __init__(self, model, cfg, tokenizer: Tokenizer | None = None, *, max_num_seqs: int = 16,
                 max_model_len: int = 4096, max_num_batched_tokens: int | None = None,
                 extra_state_slots: int = 0, spec_tokens: int = 0, device: str | torch.device = "cpu",
                 overlap_decode: bool | None = None, tp_group=None, enable_prefix_caching: bool = True,
                 prefix_cache_slots: int | None = None, num_kv_blocks: int | None = None,
                 prefill_graphs: bool = True):
        """spec_tokens: MTP drafts per step (0 = no speculative decoding); needs a checkpoint with mtp.* weights.
        enable_prefix_caching: reuse the KV blocks and recurrent-state snapshots of earlier requests' prefixes;
        prefix_cache_slots: snapshots kept (each one state slot; default max(8, max_num_seqs)); num_kv_blocks: KV
        cache blocks of 16 positions (default: max_num_seqs x max_model_len positions).
        max_num_batched_tokens: tokens per step, which also fixes the prompt chunk grid (default 8192 on CUDA, where
        64 prompts of 128 tokens took half the time of 2048 (benchmarks/RESULTS.md, issue 17); 2048 on the CPU).
        overlap_decode: in runs of decode steps that keep no logits, launch step N+1 (its input tokens taken on
        the device) before reading step N's tokens, so the host's work hides behind the GPU's; default on for CUDA.
        prefill_graphs: CUDA graphs of steps with prompt chunks (engine/prefill_graphs.py): TTFT 3 ms instead of 54
        for 128 tokens on an H100 (0.8B-class model, random bf16 weights; HF 47 ms in that run; benchmarks/RESULTS.md,
        issue 17); on by default for CUDA (no effect on the CPU).
        tp_group: model is rank 0's shard of a tensor-parallel model whose other ranks run in worker processes
        (from_pretrained(..., tensor_parallel_size=N) starts them); every runner call then runs on all ranks."""
        self.cfg, self.tokenizer = cfg, tokenizer
        self.device = torch.device(device)
        self.max_model_len = max_model_len
        if spec_tokens and model.mtp is None:
            raise ValueError("spec_tokens > 0 needs MTP weights (mtp.*), and this checkpoint has none")
        mtp_layers = len(model.mtp.layers) if spec_tokens else 0
        spare = extra_state_slots + max_num_seqs * spec_tokens  # benchmarks' and verification's state slots
        snapshots = 0 if not enable_prefix_caching else \
            max(8, max_num_seqs) if prefix_cache_slots is None else prefix_cache_slots
        self.cache = HybridCache(cfg, max_num_seqs, max_model_len, model.dtype, self.device, spare + snapshots,
                                 mtp_layers, num_kv_blocks)
        self.runner = ModelRunner(model, self.cache, self.device, prefill_graphs)
        if tp_group is not None:
            model.set_tensor_parallel(tp_group)
            self.runner = MirroredRunner(self.runner, tp_group)
        budget = max_num_batched_tokens or max(8192 if self.device.type == "cuda" else 2048, max_num_seqs)
        # prompts split where they would be alone: chunks that fit beside every running sequence's decode
        chunk = prefill_grid(budget, budget - max_num_seqs * (1 + spec_tokens))
        first = max_num_seqs + spare  # the snapshot slots come last
        self.kv = KVManager(self.runner.cache, max_model_len, spec_tokens, list(range(first, first + snapshots)),
                            chunk)
        log.info("%d slots x %d tokens: %s", max_num_seqs, max_model_len, self.memory_report())
        self.drafter = MTPDrafter(self.runner, spec_tokens, max_num_seqs, max_model_len) if spec_tokens else None
        self.scheduler = Scheduler(SlotTable(max_num_seqs), budget, chunk, admit=self.kv.admit,
                                   release=self.kv.release)
        self.requests: dict[str, Sequence] = {}
        self.stats = EngineStats()
        # overlapped steps hand the next step a device tensor and an event: not across processes (tensor parallel)
        self.overlap_decode = (self.device.type == "cuda" and tp_group is None) if overlap_decode is None \
            else overlap_decode
        self.in_flight: InFlight | None = None  # a launched decode step whose tokens are not read yet

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", dtype: str = "auto",
                        tensor_parallel_size: int = 1, **kwargs) -> "LLMEngine":
        """tensor_parallel_size N > 1: N processes (this one rank 0), each holding its shard (parallel/shard.py);
        gloo on the CPU, NCCL on CUDA."""
        torch_dtype = resolve_dtype(path, dtype, torch.device(device))
        if tensor_parallel_size > 1:
            ckpt_cfg = open_checkpoint(path)[1]
            shard_config(ckpt_cfg, tensor_parallel_size)  # a size that does not divide the heads fails here, alone
            kwargs["tp_group"] = start_group(path, device, torch_dtype, tensor_parallel_size, dict(kwargs))
        model, cfg = load_model(path, torch_dtype, device, tp=(0, tensor_parallel_size))
        return cls(model, cfg, load_tokenizer(path), device=device, **kwargs)

    def memory_report(self) -> str:
        """Resident weight bytes (as held: quantized, packed or float) and the cache's sizes."""
        return f"weights {self.runner.model.weight_bytes() / 2**20:.1f} MiB resident; {self.cache.size.describe()}"

    def prefix_cache_stats(self) -> dict[str, float]:
        """Prefix cache counters (queries, hits, tokens looked up / served, hit rate) and pool occupancy."""
        st = self.kv.stats
        return {"queries_total": st.queries, "hits_total": st.hits, "queried_tokens_total": st.queried_tokens,
                "cached_tokens_total": st.cached_tokens, "hit_rate": st.hit_rate, **self.kv.occupancy()}

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
        self.kv.check_fits(seq)
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        seq = self.requests.pop(request_id, None)
        if seq is not None and seq.status is not Status.FINISHED:
            self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self.in_flight is not None

    def step(self) -> list[RequestOutput]:
        """Runs one step and returns its outputs. A decode step may leave the next one running (overlap_decode)."""
        if self.in_flight is None:
            plan = self.scheduler.schedule()
            if not plan:
                return []
            if not self._overlappable(plan):
                return self._run(plan)
            self.in_flight = self._launch(plan, None)
        done, self.in_flight = self.in_flight, None
        if self._chainable(done):
            self.in_flight = self._launch(self.scheduler.schedule(), done)
        return self._collect(done)

    def _overlappable(self, plan: list[tuple[Sequence, int]]) -> bool:
        """A plain decode step that keeps no logits: its tokens are picked on the device (a row with top-p alone
        syncs the host there, see sampling.sampler.SampledRows, so that step does not overlap in effect)."""
        return self.overlap_decode and self.drafter is None and all(
            n == 1 and not seq.in_prefill and not seq.keep_logits and seq.params.logprobs is None for seq, n in plan)

    def _chainable(self, done: InFlight) -> bool:
        """Whether the next plan is surely `done`'s sequences again, one decode each, before reading its tokens.

        A sequence that finishes at `done` still runs one more step (its token is dropped; its slot is
        reset by the next owner's prefill, which runs after it on the stream)."""
        sched = self.scheduler
        return (len(sched.running) == len(done.seqs) and all(a is b for a, b in zip(sched.running, done.seqs))
                and not (sched.waiting and sched.slots.available) and len(done.seqs) <= sched.budget
                and self._overlappable([(seq, 1) for seq in done.seqs]))

    def _launch(self, plan: list[tuple[Sequence, int]], prev: InFlight | None) -> InFlight:
        """Starts a decode step. After prev (not read yet), each input token is prev's on the device, one
        position further than the cache holds on the host's books. Sampled rows draw their uniform now."""
        if prev is None:
            segments = [Segment(seq.next_tokens(1), seq.num_computed, seq.slot) for seq, _ in plan]
        else:
            segments = [Segment([0], seq.num_computed + 1, seq.slot) for seq, _ in plan]  # [0]: taken from prev
        for (seq, _), seg in zip(plan, segments):
            self.kv.extend(seq, seg.start_pos + 1)
        self.kv.flush()
        sampled = sampled_rows([seq.params for seq, _ in plan], [seq.generator for seq, _ in plan],
                               self.cfg.vocab_size, self.device)
        tokens = self.runner.launch_decode(segments, None if prev is None else prev.tokens, sampled)
        self._count(plan)
        self.stats.overlapped_steps += prev is not None
        return InFlight([seq for seq, _ in plan], tokens)

    def _collect(self, done: InFlight) -> list[RequestOutput]:
        outputs = []
        for seq, tok in zip(done.seqs, done.tokens.tolist()):
            if seq.status is Status.RUNNING:  # one finished or aborted since the launch drops its token
                seq.num_computed += 1
                outputs.append(self._emit(seq, [tok], None))
        return outputs

    def _run(self, plan: list[tuple[Sequence, int]]) -> list[RequestOutput]:
        """A step that waits for its logits: prefills, verifies, kept logits or logprobs."""
        segments = [self._segment(seq, n) for seq, n in plan]
        for (seq, _), seg in zip(plan, segments):
            self.kv.extend(seq, seg.start_pos + len(seg.token_ids))
        self.kv.flush()
        if self.drafter:
            logits, hidden = self.runner.run(segments, keep_hidden=True)
        else:
            logits, hidden = self.runner.run(segments), [None] * len(plan)
        self._count(plan)
        outputs, to_sample, mtp_rows = [], [], []
        for (seq, n), seg_logits, h in zip(plan, logits, hidden):
            start, was_prefill = seq.num_computed, seq.in_prefill
            if was_prefill or n == 1:
                seq.num_computed += n
                mtp_rows.append((seq, start, h))
                if was_prefill and seq.prompt_logits_from is not None:
                    seq.prompt_logits.append(seg_logits)  # rows for this chunk's positions >= prompt_logits_from
                if was_prefill and (seq.num_computed % self.scheduler.chunk == 0 or seq.num_computed == seq.branch
                                    or not seq.in_prefill):
                    # on the prefill grid (where uncached runs split too), at a branch point, and at the prompt's
                    # end: a chat's next turn resumes there when its reply, re-rendered by the chat template,
                    # differs from the tokens
                    self.kv.snapshot(seq, seq.num_computed)
                if seq.in_prefill:
                    continue
                if len(seq.output_ids) >= seq.max_tokens:  # prefill-only request (max_tokens == 0)
                    self._finish(seq, "length")
                    outputs.append(self._output(seq, 0))
                else:
                    to_sample.append((seq, seg_logits[-1:]))
                continue
            # a verify segment: the pending token and n-1 drafts
            tokens = accept(seg_logits, seq.draft_ids[:n - 1], seq.draft_probs[:n - 1], seq.params, seq.generator)
            self.drafter.settle(seq, n, len(tokens) - 1)
            seq.num_computed += len(tokens)
            seq.num_drafted, seq.num_accepted = seq.num_drafted + n - 1, seq.num_accepted + len(tokens) - 1
            self.stats.draft_tokens += n - 1
            self.stats.accepted_tokens += len(tokens) - 1
            mtp_rows.append((seq, start, h[: len(tokens)]))
            outputs.append(self._emit(seq, tokens, seg_logits))
        if to_sample:
            rows = torch.cat([lg for _, lg in to_sample])
            tokens = sample(rows, [s.params for s, _ in to_sample], [s.generator for s, _ in to_sample])
            outputs += [self._emit(seq, [tok], lg) for (seq, lg), tok in zip(to_sample, tokens)]
        if self.drafter:
            live = [row for row in mtp_rows if row[0].status is Status.RUNNING]
            for seq, _, _ in live:  # the draft chain writes the MTP head's KV up to k positions ahead
                self.kv.extend(seq, seq.num_computed + self.drafter.k)
            self.kv.flush()
            self.drafter.propose(live)
        return outputs

    def _segment(self, seq: Sequence, n: int) -> Segment:
        if seq.in_prefill or n == 1:
            return Segment(seq.next_tokens(n), seq.num_computed, seq.slot, seq.logits_wanted(n))
        tokens = seq.next_tokens(1) + seq.draft_ids[: n - 1]
        return Segment(tokens, seq.num_computed, seq.slot, n, self.drafter.snapshot_slots(seq, n))

    def _emit(self, seq: Sequence, tokens: list[int], rows: torch.Tensor | None) -> RequestOutput:
        """Appends new tokens (rows[i]: the logits token i came from; None when nobody wants them) until a stop
        condition."""
        for i, tok in enumerate(tokens):
            seq.output_ids.append(tok)
            if seq.keep_logits:
                seq.output_logits.append(rows[i])
            if seq.params.logprobs is not None:
                seq.logprobs.append(token_logprobs(rows[i], tok, seq.params.logprobs))
            self.stats.generated_tokens += 1
            reason = self._stop_reason(seq, tok)
            if reason:
                self._finish(seq, reason)
                break
        return self._output(seq, min(len(tokens), len(seq.output_ids)))

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
        """Ends a request; its state is cached first, keyed by the tokens it holds: in an overlapped run the step
        launched after this one has also fed it the last output token (the state and KV it writes land before the
        slot's and blocks' next owners run), else the cache holds num_computed tokens (the last output not fed)."""
        fed = self.in_flight is not None and any(s is seq for s in self.in_flight.seqs)
        self.kv.snapshot(seq, seq.num_computed + fed)
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
            num_draft_tokens=seq.num_drafted,
            num_accepted_tokens=seq.num_accepted,
            num_cached_tokens=seq.num_cached,
        )

