"""The only place that turns segments into tensors and runs the model."""

from __future__ import annotations

from threading import get_ident

import torch

from ..cache.state_cache import HybridCache
from ..kernels import cpu_native
from ..layers.cpu_packed import pack_for_cpu
from ..layers.model import HybridModel
from ..sampling.sampler import SampledRows, pick
from ..forward_batch import BatchError, Segment, build_batch, check_segments
from .batch import decompose_tokens
from .cuda_graphs import DecodeGraphs
from .prefill_graphs import PrefillGraphs
from .step_tokens import StepTokens


LARGE_STEP = 1024  # tokens
LARGE_LOGITS = 2 << 20  # bytes of a step's float32 logits (4 rows of a 151936 vocabulary: 2.4 MB)


class ModelRunner:
    def __init__(self, model: HybridModel, cache: HybridCache, device: torch.device, prefill_graphs: bool = True):
        self.model, self.cache, self.device = model, cache, device
        packed = device.type == "cpu" and pack_for_cpu(model)  # weights repacked for the native kernels (issue 15)
        # from the first step with this many tokens or logits on, freed memory is kept for reuse: such a step's
        # activations (tens of MB) or logits would page-fault in afresh every step (2 ms of a 9.5 ms step of 8
        # sequences at vocabulary 151936, benchmarks/RESULTS.md); one-sequence runs keep their smaller resident size
        self.native, self.keep_memory = packed, packed
        self.denormals_off_for = None  # (thread, pool size) flush_denormals last ran for
        cuda = device.type == "cuda"
        self.graphs = DecodeGraphs(model, cache, device) if cuda else None  # decode steps
        self.prefill_graphs = PrefillGraphs(model, cache, device) if cuda and prefill_graphs else None  # prompt chunks

    def _prepare_cpu(self, segments: list[Segment]) -> None:
        """Native CPU kernels: denormals off on the threads that will run this step (cpu_native.flush_denormals), and
        at the first large step (see __init__) glibc keeping freed memory (cpu_native.keep_freed_memory)."""
        if not self.native:
            return
        if self.denormals_off_for != (now := (get_ident(), torch.get_num_threads())):
            cpu_native.flush_denormals()
            self.denormals_off_for = now
        if self.keep_memory and (sum(len(s.token_ids) for s in segments) >= LARGE_STEP or
                                 sum(s.num_logits for s in segments) * self.model.cfg.vocab_size * 4 >= LARGE_LOGITS):
            cpu_native.keep_freed_memory()
            self.keep_memory = False

    @torch.inference_mode()
    def run(self, segments: list[Segment], keep_hidden: bool = False):
        """Runs one step; returns each segment's wanted logits ([num_logits, V] float32) in input order,
        and with keep_hidden also each segment's final hidden states ([len, D], for the MTP head)."""
        check_segments(segments, self.cache.max_num_seqs, self.cache.max_model_len)
        self._prepare_cpu(segments)
        if not keep_hidden:
            for graphs in (self.graphs, self.prefill_graphs):
                if graphs is not None and (logits := graphs.run(segments)) is not None:
                    return logits
        batch = self._batch(segments)
        hidden = self.model(batch, self.cache)
        logits = batch.split_logits(self.model.logits(hidden[batch.logits_index]))
        return (logits, batch.split_tokens(hidden)) if keep_hidden else logits

    @torch.inference_mode()
    def launch_decode(self, segments: list[Segment], prev: StepTokens | None,
                      sampled: SampledRows | None) -> StepTokens:
        """Starts a step of single-token segments and returns their next tokens without waiting for them:
        the argmax, or for `sampled` rows a draw from their filtered distribution.

        With prev (the previous launch, same sequences in the same order), each segment's input token is
        prev's token for it, still on the device (the segments' token ids are then placeholders)."""
        check_segments(segments, self.cache.max_num_seqs, self.cache.max_model_len)
        if self.graphs is not None and (tokens := self.graphs.launch(segments, prev, sampled)) is not None:
            return tokens
        if any(len(s.token_ids) != 1 or s.snapshot_slots for s in segments):
            raise BatchError("launch_decode takes single-token segments only")
        self._prepare_cpu(segments)
        batch = self._batch(segments)  # single-token segments keep their order: row i is segment i
        if prev is not None:
            batch.input_ids.copy_(prev.device)
        return StepTokens.of(pick(self.model.logits(self.model(batch, self.cache)), sampled))

    @torch.inference_mode()
    def run_mtp(self, segments: list[Segment], hidden: list[torch.Tensor], step: int):
        """Runs the MTP head: segment rows are (main hidden at position p, token p+1) at position p.

        Returns per segment (draft logits [num_logits, V], MTP outputs [num_logits, D]), input order."""
        check_segments(segments, self.cache.max_num_seqs, self.cache.max_model_len)
        batch = self._batch(segments)
        out = self.model.mtp(batch.join_tokens(hidden), self.model.embed(batch.input_ids), batch,
                             self.cache.mtp_kv[step % len(self.cache.mtp_kv)], step)[batch.logits_index]
        return list(zip(batch.split_logits(self.model.logits(out)), batch.split_logits(out)))

    def _batch(self, segments: list[Segment]):  # the segments passed check_segments (every entry point's first step)
        return build_batch(segments, self.cache.max_num_seqs, self.device, self.cache.num_slots, self.cache.block_table)

    def run_tokens(self, token_ids: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """llama.cpp-style batch: token i of the sequence in `slots[i]` at `positions[i]`, in any interleaving.

        Regroups the tokens into one segment per sequence, runs them in one step and returns the
        logits of every token ([T, V]) in the order given.
        """
        grouped, row_of = decompose_tokens(token_ids, positions, slots)
        logits = torch.cat(self.run([Segment(ids, start, slot, len(ids)) for slot, start, ids in grouped]))
        return logits[row_of]
