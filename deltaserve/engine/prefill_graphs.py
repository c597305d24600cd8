"""CUDA graphs of steps with prompt chunks (issue 17): prefill chunks, and decodes beside them, padded to a shape.

Letters: D = a graph's decode rows, T = its prefill tokens (a bucket), N = its segments (D of them decodes),
NT = its CHUNK-token chunks, V = vocab.
An eager prefill of a small model is host-bound (24 layers of hidden 1024: ~20 ms of Python and launches for
~2 ms of GPU work on a 128-token prompt); a graph replays the whole step in one launch.
Shapes are fixed per graph, data is not: token ids, positions, slots, cu_seqlens, the chunk index and the logits
rows are copied into the graph's static inputs from one pinned buffer before each replay, so one graph serves
every slot assignment and every split of its tokens into segments of its shape. The step's decodes come first,
padded to D by one-token rows in slot -1, then its prefill chunks, padded to T by one segment in slot -1: every
kernel skips slot -1 (no state, conv window or KV read or written; attention writes zeros) and its logits are
dropped. Host-side sizes the kernels take (the longest segment: attention's grid, the conv's tile) are upper
bounds in the graph's batch; the work comes from the data. A shape is captured the second time it is seen (a
one-off shape stays eager), at most MAX_GRAPHS of them; the warm-up run before capture uses the step's own layout
with every slot -1, so capturing touches no state. Pure-decode steps take the decode graphs (cuda_graphs.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from .. import kernels
from ..forward_batch import CHUNK, ForwardBatch, Segment, SegmentGroup
from .cuda_graphs import CAPTURE_SIZES, capture

TOKEN_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)  # then every 512
MAX_TOKENS = 16384  # larger steps are GPU-bound: eager
MAX_GRAPHS = 32
log = logging.getLogger(__name__)

Shape = tuple[int, int, int, int]  # (D, T, N, NT)


def bucket(tokens: int) -> int:
    """The graph size a step of `tokens` prefill tokens runs in."""
    return next((b for b in TOKEN_BUCKETS if b >= tokens), -(-tokens // 512) * 512)


def decode_rows(n: int) -> int:
    """The decode rows a step of n decodes runs in (0 for none; CAPTURE_SIZES, then multiples of 64)."""
    return 0 if n == 0 else next((b for b in CAPTURE_SIZES if b >= n), -(-n // 64) * 64)


def layout(segments: list[Segment], d: int, t: int) -> tuple[Shape, np.ndarray, list[int]]:
    """The step laid out as a graph of d decode rows and t prefill tokens takes it: (its shape, its static inputs as
    one int64 array, the logits row of each segment). The array holds, in order: ids [D+T], positions [D+T], token
    slots [D+T], token segments [D+T], slots [N], reset flags [N], cu_seqlens [N+1], logits rows [N], the prefill
    segments' cu_seqlens counted from their first token [N-D+1] and chunk index [NT, 2] (segment, chunk within it)."""
    dec = [i for i, s in enumerate(segments) if len(s.token_ids) == 1]
    pre = [i for i, s in enumerate(segments) if len(s.token_ids) > 1]
    rows = [(segments[i].token_ids, segments[i].start_pos, segments[i].slot) for i in dec]
    rows += [([0], 0, -1)] * (d - len(dec))
    rows += [(segments[i].token_ids, segments[i].start_pos, segments[i].slot) for i in pre]
    pad = t - sum(len(segments[i].token_ids) for i in pre)
    assert pad >= 0 and d >= len(dec)
    rows += [([0] * pad, 0, -1)] * bool(pad)
    lens = np.array([len(ids) for ids, _, _ in rows])
    starts = np.array([start for _, start, _ in rows])
    slots = np.array([slot for _, _, slot in rows])
    n = len(rows)
    cu = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    chunks = -(-lens[d:] // CHUNK)  # of the prefill segments
    nt = int(chunks.sum())
    first_chunk = np.repeat(np.cumsum(chunks) - chunks, chunks)  # [NT] index of its segment's first chunk
    index = np.stack([np.repeat(np.arange(n - d), chunks), np.arange(nt) - first_chunk], axis=1)
    ids = np.concatenate([np.asarray(ids, dtype=np.int64) for ids, _, _ in rows])
    positions = np.arange(d + t) - np.repeat(cu[:-1] - starts, lens)
    flat = np.concatenate([ids, positions, np.repeat(slots, lens), np.repeat(np.arange(n), lens), slots, starts == 0,
                           cu, cu[1:] - 1, cu[d:] - d, index.reshape(-1)])
    where = [0] * len(segments)  # logits row of each segment
    for row, i in enumerate(dec + pre):
        where[i] = row if row < len(dec) else row + d - len(dec)
    return (d, t, n, nt), flat.astype(np.int64, copy=False), where


def static_batch(shape: Shape, inputs: torch.Tensor, num_slots: tuple[int, int],
                 block_table: torch.Tensor | None) -> ForwardBatch:
    """The batch whose tensors are views of `inputs` (laid out as `layout` says; the reset flags 0/1 as int64);
    its host lengths of prefill segments are upper bounds (each as long as T), the kernels take the real ones from
    cu_seqlens."""
    d, t, n, nt = shape
    ids, pos, token_slots, token_segment, slots, reset, cu, rows, cu_pre, index = inputs.split(
        [d + t, d + t, d + t, d + t, n, n, n + 1, n, n - d + 1, 2 * nt])
    unread = inputs[:0]  # the torch reference's padded layout: not read on CUDA
    groups = [SegmentGroup(tokens=tokens, slots=slots[part], reset=reset[part], start_pos=unread, lens=unread,
                           pad_index=unread, valid=unread, kind=kind)
              for kind, tokens, part in (("decode", slice(0, d), slice(0, d)), ("prefill", slice(d, d + t), slice(d, n)))
              if tokens.stop > tokens.start]
    return ForwardBatch(
        input_ids=ids, positions=pos, token_slots=token_slots, token_segment=token_segment, cu_seqlens=cu,
        slots=slots, reset=reset, lens=[1] * d + [t] * (n - d), start_pos=[0] * n, slot_ids=[-1] * n, snapshots=False,
        groups=groups, logits_index=rows, logits_split=[1] * n, order=list(range(n)), num_slots=num_slots,
        block_table=block_table, derived={("chunks", d, CHUNK): (cu_pre, index.view(nt, 2))})


def slotless(shape: Shape, flat: np.ndarray) -> torch.Tensor:
    """A step's static inputs with every token and segment in slot -1 (the rest as `flat`)."""
    inputs = torch.from_numpy(flat.copy())
    batch = static_batch(shape, inputs, (0, 0), None)
    batch.token_slots.fill_(-1)
    batch.slots.fill_(-1)
    return inputs


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
        self.graphs: dict[Shape, Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.logits: torch.Tensor | None = None  # [N_max, V] in the model's dtype, written by every replay
        self.copied = torch.cuda.Event()  # the last host -> device input copy has read its pinned buffer
        self.failed = False  # a capture failed: no more are tried

    def run(self, segments: list[Segment]) -> list[torch.Tensor] | None:
        """Each segment's logits ([num_logits, V] float32, input order), or None when no graph takes this step
        (no prompt chunk in it, verifies, all-token logits, too many tokens, a shape seen once)."""
        # slots and positions are checked by the runner (forward_batch.check_segments)
        if any(s.num_logits > 1 or s.snapshot_slots for s in segments):
            return None
        n_dec = sum(len(s.token_ids) == 1 for s in segments)
        t = bucket(sum(len(s.token_ids) for s in segments) - n_dec)
        if n_dec == len(segments) or t > MAX_TOKENS:
            return None
        shape, flat, where = layout(segments, decode_rows(n_dec), t)
        if shape not in self.graphs:
            self.seen[shape] += 1
            if self.seen[shape] < 2 or len(self.graphs) >= MAX_GRAPHS or self.failed:
                return None
            try:
                self._capture(shape, flat)
            except (RuntimeError, torch.OutOfMemoryError) as e:  # out of memory, say: steps stay eager, none lost
                log.warning("prefill graphs off: capturing %s failed: %s", shape, e)
                self.failed = True
                return None
        graph = self.graphs[shape]
        self.copied.synchronize()  # the previous copy out of a pinned buffer is done
        graph.host.numpy()[:] = flat
        graph.inputs.copy_(graph.host, non_blocking=True)
        self.copied.record()
        graph.graph.replay()
        rows = self.logits[: shape[2]].to(torch.float32, copy=True)  # fresh rows: the buffer is reused
        return [rows[r:r + s.num_logits] for r, s in zip(where, segments)]

    def _capture(self, shape: Shape, flat: np.ndarray) -> None:
        if self.logits is None:  # decode rows padded to a captured size, the prefill segments, the padding one
            rows = decode_rows(self.cache.max_num_seqs) + self.cache.max_num_seqs + 1
            self.logits = torch.empty(rows, self.model.cfg.vocab_size, dtype=self.model.dtype, device=self.device)
        inputs = torch.zeros(flat.size, dtype=torch.long, device=self.device)
        batch = static_batch(shape, inputs, (self.cache.max_num_seqs, self.cache.num_slots), self.cache.block_table)
        graph = Graph(None, batch, torch.zeros(flat.size, dtype=torch.long, pin_memory=True), inputs)
        graph.host.copy_(slotless(shape, flat))  # the warm-up (run, not captured) touches no state
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
