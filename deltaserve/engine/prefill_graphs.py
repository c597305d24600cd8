"""CUDA graphs of prefill steps (issue 17): steps of prompt chunks only, padded up to a captured shape.

Letters: T = a graph's tokens (a bucket), N = its segments, NT = its CHUNK-token chunks, V = vocab.
An eager prefill of a small model is host-bound (24 layers of hidden 1024: ~20 ms of Python and launches for
~2 ms of GPU work on a 128-token prompt); a graph replays the whole step in one launch.
Shapes are fixed per graph, data is not: token ids, positions, slots, cu_seqlens, the chunk index and the logits
rows are copied into the graph's static inputs from one pinned buffer before each replay, so one graph serves
every slot assignment and every split of its tokens into N segments of NT chunks in all. The step's tokens are
followed by a padding segment up to T in slot -1, which every kernel skips (no state, conv window or KV read or
written; attention writes zeros) and whose logits are dropped. Host-side sizes the kernels take (the longest
segment: attention's grid, the conv's tile) are upper bounds in the graph's batch; the work comes from the data.
A shape is captured the second time it is seen (a one-off shape stays eager), at most MAX_GRAPHS of them; the
warm-up run before capture uses the step's own layout with every slot -1, so capturing touches no state.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from .. import kernels
from ..forward_batch import CHUNK, ForwardBatch, Segment, SegmentGroup
from .cuda_graphs import capture

TOKEN_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)  # then every 512
MAX_TOKENS = 16384  # larger steps are GPU-bound: eager
MAX_GRAPHS = 32


def bucket(tokens: int) -> int:
    """The graph size a step of `tokens` tokens runs in."""
    return next((b for b in TOKEN_BUCKETS if b >= tokens), -(-tokens // 512) * 512)


def layout(segments: list[Segment], t: int) -> tuple[tuple[int, int, int], np.ndarray]:
    """The step padded to t tokens: (its shape (T, N, NT), its static inputs as one int64 array, in order:
    ids [T], positions [T], token slots [T], slots [N], reset flags [N], cu_seqlens [N+1], logits rows [N],
    chunk index [NT, 2] (segment, chunk within it)). The padding segment (slot -1) comes last, if any."""
    lens = [len(s.token_ids) for s in segments]
    pad = t - sum(lens)
    assert pad >= 0
    starts = [s.start_pos for s in segments] + [0] * bool(pad)
    slots = [s.slot for s in segments] + [-1] * bool(pad)
    lens += [pad] * bool(pad)
    n = len(lens)
    lens_np = np.array(lens)
    cu = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens_np, out=cu[1:])
    chunks = -(-lens_np // CHUNK)
    nt = int(chunks.sum())
    first_chunk = np.repeat(np.cumsum(chunks) - chunks, chunks)  # [NT] index of its segment's first chunk
    index = np.stack([np.repeat(np.arange(n), chunks), np.arange(nt) - first_chunk], axis=1)
    ids = np.zeros(t, dtype=np.int64)
    ids[: cu[-1] - pad] = [tok for s in segments for tok in s.token_ids]
    positions = np.arange(t) - np.repeat(cu[:-1], lens_np) + np.repeat(starts, lens_np)
    token_slots = np.repeat(slots, lens_np)
    reset = np.array(starts) == 0
    flat = np.concatenate([ids, positions, token_slots, slots, reset, cu, cu[1:] - 1, index.reshape(-1)])
    return (t, n, nt), flat.astype(np.int64, copy=False)


def static_batch(shape: tuple[int, int, int], inputs: torch.Tensor, num_slots: tuple[int, int],
                 block_table: torch.Tensor | None) -> ForwardBatch:
    """The batch whose tensors are views of `inputs` (laid out as `layout` says); its host lengths are upper
    bounds (every segment as long as T), the kernels take the real ones from cu_seqlens."""
    t, n, nt = shape
    ids, pos, token_slots, slots, reset, cu, rows, index = inputs.split([t, t, t, n, n, n + 1, n, 2 * nt])
    unread = inputs[:0]  # the torch reference's padded layout and per-token segment index: not read on CUDA
    group = SegmentGroup(tokens=slice(0, t), slots=slots, reset=reset, start_pos=unread, lens=unread,
                         pad_index=unread, valid=unread, kind="prefill")
    return ForwardBatch(
        input_ids=ids, positions=pos, token_slots=token_slots, token_segment=unread, cu_seqlens=cu, slots=slots,
        reset=reset, lens=[t] * n, start_pos=[0] * n, slot_ids=[-1] * n, snapshots=False, groups=[group],
        logits_index=rows, logits_split=[1] * n, order=list(range(n)), num_slots=num_slots, block_table=block_table,
        derived={("chunks", 0, CHUNK): (cu, index.view(nt, 2))})


@dataclass
class Graph:
    graph: torch.cuda.CUDAGraph | None
    batch: ForwardBatch  # its tensors are views of `inputs`
    host: torch.Tensor  # pinned twin of inputs
    inputs: torch.Tensor  # the static inputs, laid out as `layout` says


class PrefillGraphs:
    def __init__(self, model, cache, device: torch.device):
        self.model, self.cache, self.device = model, cache, device
        self.seen: Counter = Counter()
        self.graphs: dict[tuple[int, int, int], Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.logits: torch.Tensor | None = None  # [N_max, V] in the model's dtype, written by every replay
        self.copied = torch.cuda.Event()  # the last host -> device input copy has read its pinned buffer

    def run(self, segments: list[Segment]) -> list[torch.Tensor] | None:
        """Each segment's logits ([num_logits, V] float32, input order), or None when this step is not a prefill
        step a graph takes (decodes or verifies in it, all-token logits, too many tokens, a shape seen once)."""
        # slots and positions are checked by the runner (forward_batch.check_segments)
        if any(len(s.token_ids) < 2 or s.num_logits > 1 or s.snapshot_slots for s in segments):
            return None
        t = bucket(sum(len(s.token_ids) for s in segments))
        if t > MAX_TOKENS:
            return None
        shape, flat = layout(segments, t)
        if shape not in self.graphs:
            self.seen[shape] += 1
            if self.seen[shape] < 2 or len(self.graphs) >= MAX_GRAPHS:
                return None
            self._capture(shape, flat)
        graph = self.graphs[shape]
        self.copied.synchronize()  # the previous copy out of a pinned buffer is done
        graph.host.numpy()[:] = flat
        graph.inputs.copy_(graph.host, non_blocking=True)
        self.copied.record()
        graph.graph.replay()
        rows = self.logits[: len(segments)].to(torch.float32, copy=True)  # fresh rows: the buffer is reused
        return [rows[i:i + s.num_logits] for i, s in enumerate(segments)]

    def _capture(self, shape: tuple[int, int, int], flat: np.ndarray) -> None:
        t, n, nt = shape
        if self.logits is None:
            rows = self.cache.max_num_seqs + 1
            self.logits = torch.empty(rows, self.model.cfg.vocab_size, dtype=self.model.dtype, device=self.device)
        inputs = torch.zeros(flat.size, dtype=torch.long, device=self.device)
        batch = static_batch(shape, inputs, (self.cache.max_num_seqs, self.cache.num_slots), self.cache.block_table)
        graph = Graph(None, batch, torch.zeros(flat.size, dtype=torch.long, pin_memory=True), inputs)
        warm = flat.copy()
        warm[2 * t:3 * t + n] = -1  # every token and segment in slot -1: the warm-up run touches no state
        graph.host.numpy()[:] = warm
        graph.inputs.copy_(graph.host)
        with _fla_tensor_cache_off():
            graph.graph = capture(lambda: self._forward(batch), self.pool)
        self.graphs[shape] = graph

    def _forward(self, batch: ForwardBatch) -> None:
        hidden = self.model(batch, self.cache)
        kernels.linear(hidden[batch.logits_index], self.model.head_weight, out=self.logits[:len(batch.lens)])


@contextlib.contextmanager
def _fla_tensor_cache_off():
    """fla memoizes tensors it derives from cu_seqlens by the tensor's identity: a graph's static cu_seqlens must
    have its derived tensors computed inside the capture (so that replays recompute them), not found in a cache
    filled by an earlier run with other contents."""
    import fla.utils
    before = fla.utils.FLA_DISABLE_TENSOR_CACHE
    fla.utils.FLA_DISABLE_TENSOR_CACHE = True
    try:
        yield
    finally:
        fla.utils.FLA_DISABLE_TENSOR_CACHE = before
