"""The forward batch: segments of any number of sequences, as tensors the layers and kernels read.

The engine builds it (`build_batch`); layers and kernels only read it, so it sits below all three.

Letters: T = tokens in the batch, N = segments (one per sequence), B = segments in a group,
L = longest segment of a group, S = state slots in the pool.

Segments are ordered single-token first (decodes), then verify segments (speculative decoding:
the state after every token is kept in a snapshot slot), then multi-token prefill chunks, like vLLM:
decodes and verifies take the recurrent form of the delta rule, prefill chunks the chunked form. Nothing here is cached
across steps: a new batch is built every step, and slots are data in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .transfer import on_device


CHUNK = 64  # the chunked delta rule's chunk (fla's), the default size of chunk_meta's chunks


class BatchError(ValueError):
    """A batch that cannot be decomposed into one contiguous segment per sequence."""


@dataclass(frozen=True)
class Segment:
    token_ids: list[int]
    start_pos: int  # position of the first token; 0 resets the slot's recurrent state
    slot: int
    num_logits: int = 1  # logits wanted for this many trailing tokens (0 = none, len = all)
    snapshot_slots: tuple[int, ...] = ()  # state after token j goes to snapshot_slots[j] (len - 1 of them)


def check_segments(segments: list[Segment], num_slots: int, max_len: int) -> None:
    """The guards every path of a step applies before any kernel runs (batched or graphed): distinct slots with a
    KV row (in [0, num_slots)), positions in [0, max_len)."""
    if not segments:
        raise BatchError("empty batch")
    slots = [s.slot for s in segments]
    if len(set(slots)) != len(slots):
        raise BatchError(f"slots {slots} appear twice in one batch")
    for s in segments:
        if not 0 <= s.slot < num_slots:
            raise BatchError(f"slot {s.slot} has no KV row (max_num_seqs {num_slots})")
        if s.start_pos < 0 or s.start_pos + len(s.token_ids) > max_len:
            raise BatchError(f"slot {s.slot}: positions {s.start_pos}..{s.start_pos + len(s.token_ids)} outside "
                             f"[0, max_model_len {max_len}]")


@dataclass
class SegmentGroup:
    """Consecutive segments laid out padded: `pad_index[b, i]` is the token row of position i of segment b."""

    tokens: slice  # rows of the batch these segments cover
    slots: torch.Tensor  # [B]
    reset: torch.Tensor  # [B] bool
    start_pos: torch.Tensor  # [B]
    lens: torch.Tensor  # [B]
    pad_index: torch.Tensor  # [B, L] row into the group's tokens, padding points at row `num_tokens`
    valid: torch.Tensor  # [B, L] bool
    kind: str  # "decode" | "verify" | "prefill"
    snapshot_slots: torch.Tensor | None = None  # verify: [B, L-1] slot for the state after token j, -1 = none

    @property
    def num_tokens(self) -> int:
        return self.tokens.stop - self.tokens.start

    def to_padded(self, x: torch.Tensor) -> torch.Tensor:
        """[T_group, ...] -> [B, L, ...] with zeros in padding."""
        x = torch.cat([x, x.new_zeros((1, *x.shape[1:]))])
        return x[self.pad_index]

    def from_padded(self, y: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> [T_group, ...]"""
        return y[self.valid]


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    token_slots: torch.Tensor  # [T] slot of each token (KV cache row)
    token_segment: torch.Tensor  # [T] segment index of each token
    cu_seqlens: torch.Tensor  # [N + 1]
    slots: torch.Tensor  # [N]
    reset: torch.Tensor  # [N] bool
    lens: list[int]  # host copies of per-segment metadata: reading them never syncs a device
    start_pos: list[int]
    slot_ids: list[int]
    snapshots: bool  # some segment keeps per-token states
    groups: list[SegmentGroup]  # decode group (all length 1) then prefill group; empty ones left out
    logits_index: torch.Tensor  # [R] token rows whose logits are wanted
    logits_split: list[int]  # how many of those rows belong to each segment, in segment order
    order: list[int]  # order[j] = index in the caller's list of the j-th segment here
    segments: list[Segment] = field(default_factory=list)  # in batch order
    num_slots: tuple[int, int] = (0, 0)  # build_batch's (num_slots, num_state_slots)
    block_table: torch.Tensor | None = None  # [S, MB] int32: the KV cache's blocks per slot (the cache's own tensor)
    derived: dict = field(default_factory=dict)  # tensors kernels derive from the batch, built once per batch, by key
    _parts: list[ForwardBatch] | None = None

    @property
    def num_segments(self) -> int:
        return len(self.lens)

    @property
    def num_decodes(self) -> int:
        """How many single-token segments lead the batch (the decode group)."""
        return self.groups[0].num_tokens if self.groups and self.groups[0].kind == "decode" else 0

    @property
    def one_token_each(self) -> bool:
        """Every segment is a single token (decodes, one-token prompts) and none keeps per-token states."""
        return sum(self.lens) == len(self.lens) and not self.snapshots

    def parts(self) -> list[ForwardBatch] | None:
        """The batch as consecutive parts whose sequence-mixing kernels (delta rule, attention) do not depend on
        one another: all decode rows together (their kernels work row by row), then every longer segment alone,
        computed as if it were the step's only one. None where the batch is one such part already.
        Used on the CPU, where int8 activation rounding would magnify the float rounding of a padded group."""
        n_dec = len(self.groups[0].lens) if self.groups[0].kind == "decode" else 0
        if len(self.segments) <= 1 or n_dec == len(self.segments):
            return None
        if self._parts is None:
            parts = ([self.segments[:n_dec]] if n_dec else []) + [[seg] for seg in self.segments[n_dec:]]
            self._parts = [build_batch(p, self.num_slots[0], self.input_ids.device, self.num_slots[1], self.block_table)
                           for p in parts]
        return self._parts

    def blocks_for(self, k_cache: torch.Tensor) -> torch.Tensor:
        """The block table attention reads k_cache [NB, BS, G, D] through: the cache's own, or where the batch has
        none (caches laid out one block per slot: layer tests, training) block s of slot s."""
        if self.block_table is not None:
            return self.block_table
        return torch.arange(k_cache.shape[0], dtype=torch.int32, device=k_cache.device)[:, None]

    @property
    def single_slot(self) -> int | None:
        """The slot when the batch holds one sequence: layers then use views of it, no gather/scatter."""
        return self.slot_ids[0] if len(self.lens) == 1 and not self.snapshots else None

    def chunk_meta(self, first: int, size: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
        """For chunked kernels over segments first..N-1 (fla's varlen convention): (cu_seqlens [M+1] counted from
        their first token, chunk index [NT, 2] = (segment, chunk within it) of every `size`-token chunk). Built once
        per batch from the host lengths and sent in one non-blocking copy, so the layers that read it never wait
        for the device."""
        key = ("chunks", first, size)
        if key not in self.derived:
            lens = self.lens[first:]
            cu = [0]
            for n in lens:
                cu.append(cu[-1] + n)
            index = [v for s, n in enumerate(lens) for c in range(-(-n // size)) for v in (s, c)]
            host = [torch.tensor(cu, dtype=torch.long), torch.tensor(index, dtype=torch.long).view(-1, 2)]
            self.derived[key] = tuple(on_device(host, self.cu_seqlens.device))
        return self.derived[key]

    def split_logits(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """Rows of `logits` ([R, V]) per segment, in the caller's original segment order."""
        return self._in_caller_order(torch.split(logits, self.logits_split))

    def split_tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-token rows ([T, ...]) per segment, in the caller's original segment order."""
        return self._in_caller_order(torch.split(x, self.lens))

    def join_tokens(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per-segment rows given in the caller's order -> [T, ...] in batch order."""
        return torch.cat([parts[i] for i in self.order])

    def _in_caller_order(self, parts) -> list[torch.Tensor]:
        out: list[torch.Tensor] = [None] * len(parts)  # type: ignore[list-item]
        for j, part in enumerate(parts):
            out[self.order[j]] = part
        return out


def build_batch(segments: list[Segment], num_slots: int, device: torch.device | str = "cpu",
                num_state_slots: int | None = None, block_table: torch.Tensor | None = None) -> ForwardBatch:
    """Lay out segments as one batch: decodes, then verifies, then prefill chunks.

    num_slots: slots with KV blocks (a segment's `slot`); num_state_slots: all state slots
    (snapshot slots may be spare ones past num_slots); block_table: the KV cache's [num_slots, MB] table."""
    if not segments:
        raise BatchError("empty batch")
    num_state_slots = num_state_slots or num_slots
    seen: set[int] = set()
    for s in segments:
        if s.snapshot_slots and len(s.snapshot_slots) != len(s.token_ids) - 1:
            raise BatchError(f"slot {s.slot}: {len(s.snapshot_slots)} snapshot slots for {len(s.token_ids)} tokens")
        for snap in s.snapshot_slots:
            if not 0 <= snap < num_state_slots or snap in seen:
                raise BatchError(f"snapshot slot {snap} is out of range or used twice")
            seen.add(snap)
        if not s.token_ids:
            raise BatchError(f"segment for slot {s.slot} has no tokens")
        if not 0 <= s.slot < num_slots:
            raise BatchError(f"slot {s.slot} out of range [0, {num_slots})")
        if s.slot in seen:
            raise BatchError(f"slot {s.slot} appears twice in one batch")
        if s.start_pos < 0:
            raise BatchError(f"negative start position {s.start_pos} for slot {s.slot}")
        if not 0 <= s.num_logits <= len(s.token_ids):
            raise BatchError(f"num_logits {s.num_logits} outside [0, {len(s.token_ids)}] for slot {s.slot}")
        seen.add(s.slot)

    def kind(s: Segment) -> str:
        return "decode" if len(s.token_ids) == 1 else "verify" if s.snapshot_slots else "prefill"

    rank = {"decode": 0, "verify": 1, "prefill": 2}
    order = sorted(range(len(segments)), key=lambda i: rank[kind(segments[i])])  # stable
    segs = [segments[i] for i in order]
    lens = [len(s.token_ids) for s in segs]
    starts = [s.start_pos for s in segs]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    ids, pos, seg_of, logit_rows = [], [], [], []
    for j, s in enumerate(segs):
        ids += s.token_ids
        pos += range(s.start_pos, s.start_pos + lens[j])
        seg_of += [j] * lens[j]
        logit_rows += range(cu[j + 1] - s.num_logits, cu[j + 1])

    def tensor(x, dtype=torch.long):  # built on the host, sent to the device in one copy at the end
        return torch.tensor(x, dtype=dtype)

    slots = tensor([s.slot for s in segs])
    reset = tensor([s.start_pos == 0 for s in segs], torch.bool)
    kinds = [kind(s) for s in segs]
    groups = []
    for k in ("decode", "verify", "prefill"):
        if k not in kinds:
            continue
        lo, hi = kinds.index(k), len(kinds) - kinds[::-1].index(k)
        g_lens = lens[lo:hi]
        width = max(g_lens)
        local = torch.arange(width)[None, :]
        g_len_t = tensor(g_lens)
        valid = local < g_len_t[:, None]
        rows = tensor(cu[lo:hi])[:, None] - cu[lo] + local
        n_tok = cu[hi] - cu[lo]
        groups.append(SegmentGroup(
            tokens=slice(cu[lo], cu[hi]),
            slots=slots[lo:hi],
            reset=reset[lo:hi],
            start_pos=tensor(starts[lo:hi]),
            lens=g_len_t,
            pad_index=torch.where(valid, rows, n_tok),
            valid=valid,
            kind=k,
            snapshot_slots=tensor([list(s.snapshot_slots) + [-1] * (width - 1 - len(s.snapshot_slots))
                                   for s in segs[lo:hi]]) if k == "verify" else None,
        ))
    batch = ForwardBatch(
        input_ids=tensor(ids),
        positions=tensor(pos),
        token_slots=slots[tensor(seg_of)],
        token_segment=tensor(seg_of),
        cu_seqlens=tensor(cu),
        slots=slots,
        reset=reset,
        lens=lens,
        start_pos=starts,
        slot_ids=[s.slot for s in segs],
        snapshots="verify" in kinds,
        groups=groups,
        logits_index=tensor(logit_rows),
        logits_split=[s.num_logits for s in segs],
        order=order,
        segments=segs,
        num_slots=(num_slots, num_state_slots),
        block_table=block_table,
    )
    return _to_device(batch, torch.device(device))


TENSOR_FIELDS = ("input_ids", "positions", "token_slots", "token_segment", "cu_seqlens", "slots", "reset",
                 "logits_index")
GROUP_FIELDS = ("slots", "reset", "start_pos", "lens", "pad_index", "valid", "snapshot_slots")


def _to_device(batch: ForwardBatch, device: torch.device) -> ForwardBatch:
    """The batch with its host tensors replaced by their device copies (one copy for all)."""
    owners = [(batch, f) for f in TENSOR_FIELDS] + [(g, f) for g in batch.groups for f in GROUP_FIELDS
                                                    if getattr(g, f) is not None]
    for (obj, name), t in zip(owners, on_device([getattr(*o) for o in owners], device)):
        setattr(obj, name, t)
    return batch
