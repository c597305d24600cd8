"""CUDA graphs for pure-decode steps, one per captured batch size; slots and positions are graph inputs.

Letters: B = captured batch size, n = sequences in the step (n <= B), V = vocab.
A step of n single-token segments runs the graph of the smallest captured B >= n. Token ids,
positions and slots are written into a pinned host buffer and copied into the graph's static device
inputs before each replay, so one graph serves every slot assignment: no slot is ever baked into a
graph (ik_llama.cpp #2260 read another slot's state that way). A step chained onto the previous one
(`launch` with prev) takes its token ids from that step's tokens on the device instead.
Padding rows carry slot -1, which every kernel skips (no state or KV read or written), and their
logits are dropped. Every replay writes the logits and their argmax into static buffers. Graphs are
captured on the first decode step, largest first, sharing one memory pool; capture runs with every
row padding, so it leaves the cache untouched.
"""

from __future__ import annotations

import dataclasses

import torch

from ..sampling.sampler import SampledRows, pick
from .. import kernels
from ..forward_batch import ForwardBatch, Segment, build_batch
from .step_tokens import StepTokens

CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


class DecodeGraphs:
    def __init__(self, model, cache, device: torch.device, max_batch: int = CAPTURE_SIZES[-1]):
        self.model, self.cache, self.device = model, cache, device
        limit = min(max_batch, cache.max_num_seqs)
        self.sizes = [s for s in CAPTURE_SIZES if s < limit] + [limit]
        top = self.sizes[-1]
        # per captured size, contiguous: rows token ids, positions, slots (pinned host, filled in place each step,
        # then copied whole into its device twin, which the graph's kernels read) and the reset flags the graph computes
        self.host = {b: torch.zeros(3, b, dtype=torch.long, pin_memory=True) for b in self.sizes}
        self.host_np = {b: h.numpy() for b, h in self.host.items()}
        self.inputs = {b: torch.zeros(3, b, dtype=torch.long, device=device) for b in self.sizes}
        self.reset = {b: torch.zeros(b, dtype=torch.bool, device=device) for b in self.sizes}
        self.copied = torch.cuda.Event()  # the last host -> device input copy has read the pinned buffer
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, ForwardBatch]] = {}  # the batch keeps its tensors alive
        self.size_of = [next(s for s in self.sizes if s >= n) for n in range(top + 1)]  # n -> captured size
        self.logits: torch.Tensor | None = None  # [top, V] in the model's dtype, written by every replay
        self.tokens = torch.zeros(top, dtype=torch.long, device=device)  # [top] argmax of each logits row

    def run(self, segments: list[Segment]) -> list[torch.Tensor] | None:
        """Each segment's logits ([1, V] float32, input order), or None when this step is not a plain decode."""
        if (step := self._replay(segments, None)) is None:
            return None
        return list(self.logits[:step].to(torch.float32, copy=True).split(1))  # fresh rows: the buffer is reused

    def launch(self, segments: list[Segment], prev: StepTokens | None,
               sampled: SampledRows | None) -> StepTokens | None:
        """Starts a step and returns its tokens without waiting, or None when it is not a plain decode.

        Rows take the argmax, computed in the graph, or are drawn as `sampled` says. With prev (the previous
        launch, same sequences in the same rows), row i's input token is prev's row i, taken on the device;
        the segments' token ids are then placeholders."""
        if (n := self._replay(segments, prev)) is None:
            return None
        tokens = self.tokens[:n] if sampled is None else pick(self.logits[:n], sampled, self.tokens[:n])
        return StepTokens.of(tokens)

    def _replay(self, segments: list[Segment], prev: StepTokens | None) -> int | None:
        """Writes the step's inputs and replays its graph; the number of rows, or None (not a plain decode)."""
        n = len(segments)
        if n > self.sizes[-1]:
            return None
        ids, pos, slots = [], [], []
        for s in segments:  # checked by the runner (forward_batch.check_segments)
            if len(s.token_ids) != 1 or s.num_logits != 1 or s.snapshot_slots:
                return None
            ids.append(s.token_ids[0])
            pos.append(s.start_pos)
            slots.append(s.slot)
        if not self.graphs:
            self._capture()
        size = self.size_of[n]
        # the last input copy ran before the graph now on the GPU started, so this rarely waits
        self.copied.synchronize()
        host = self.host_np[size]
        host[0, :n], host[1, :n], host[2, :n] = ids, pos, slots
        if n < size:
            host[:2, n:], host[2, n:] = 0, -1  # padding rows
        inputs = self.inputs[size]
        inputs.copy_(self.host[size], non_blocking=True)  # one contiguous pinned -> device copy
        self.copied.record()
        if prev is not None:
            inputs[0, :n].copy_(prev.device)
        self.graphs[size][0].replay()
        return n

    def _batch(self, size: int) -> ForwardBatch:
        """A decode batch of `size` rows whose tensors are views of the static input buffers."""
        template = build_batch([Segment([0], 1, s) for s in range(size)], self.cache.max_num_seqs, self.device,
                               self.cache.num_slots, self.cache.block_table)
        ids, pos, slots = self.inputs[size]
        reset = self.reset[size]
        group = dataclasses.replace(template.groups[0], slots=slots, reset=reset, start_pos=pos)
        return dataclasses.replace(template, input_ids=ids, positions=pos, token_slots=slots, slots=slots,
                                   reset=reset, groups=[group])

    def _forward(self, batch: ForwardBatch) -> None:
        size = batch.slots.shape[0]
        torch.eq(batch.positions, 0, out=batch.reset)  # a sequence at position 0 starts from a zero state
        model = self.model
        # as HybridModel.logits, straight into the static buffer
        logits = kernels.linear(model(batch, self.cache), model.head_weight, out=self.logits[:size])
        torch.argmax(logits, dim=-1, out=self.tokens[:size])

    @torch.inference_mode()
    def _capture(self) -> None:
        top = self.sizes[-1]
        for b in self.sizes:  # every row padding: capture (and its warm-up run) touches no state
            self.host[b][:2], self.host[b][2] = 0, -1
            self.inputs[b].copy_(self.host[b])
        self.logits = torch.empty(top, self.model.cfg.vocab_size, dtype=self.model.dtype,
                                  device=self.device)
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            batch = self._batch(size)
            self.graphs[size] = (capture(lambda: self._forward(batch), pool), batch)
        torch.cuda.synchronize()


def capture(forward, pool) -> torch.cuda.CUDAGraph:
    """forward() run once on a side stream (compiles kernels, autotunes, fills caches), then captured in `pool`."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        forward()
    return graph
