"""Slots, batch layout and scheduling as plain Python: no model involved."""

import pytest
import torch

from deltaserve.cache.slot_table import SlotTable
from deltaserve.forward_batch import GROUP_FIELDS, TENSOR_FIELDS, BatchError, Segment, build_batch
from deltaserve.transfer import packed, unpacked
from deltaserve.engine.batch import decompose_tokens
from deltaserve.engine.prefill_graphs import bucket, decode_rows, layout, slotless, static_batch
from deltaserve.kernels import reference
from deltaserve.engine.scheduler import Scheduler
from deltaserve.engine.sequence import Sequence, Status
from deltaserve.sampling.params import SamplingParams


def test_slot_table_hands_out_frees_and_reuses():
    t = SlotTable(3)
    assert [t.allocate() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="all 3 slots"):
        t.allocate()
    t.free(1)
    assert t.available == 1 and t.allocate() == 1
    with pytest.raises(RuntimeError, match="not allocated"):
        SlotTable(2).free(0)
    t2 = SlotTable(4)
    assert t2.take(2) == 2 and t2.used == {2}
    with pytest.raises(RuntimeError, match="not free"):
        t2.take(2)


def test_build_batch_orders_decodes_first_and_maps_back():
    segs = [Segment([1, 2, 3], 0, 5, num_logits=3), Segment([4], 7, 2), Segment([5, 6], 3, 0, num_logits=0),
            Segment([7], 0, 9)]
    b = build_batch(segs, 10)
    assert b.order == [1, 3, 0, 2]
    assert b.lens == [1, 1, 3, 2]
    assert b.input_ids.tolist() == [4, 7, 1, 2, 3, 5, 6]
    assert b.positions.tolist() == [7, 0, 0, 1, 2, 3, 4]
    assert b.slots.tolist() == [2, 9, 5, 0]
    assert b.reset.tolist() == [False, True, True, False]
    assert b.token_slots.tolist() == [2, 9, 5, 5, 5, 0, 0]
    assert b.cu_seqlens.tolist() == [0, 1, 2, 5, 7]
    assert b.logits_index.tolist() == [0, 1, 2, 3, 4]
    assert [g.tokens for g in b.groups] == [slice(0, 2), slice(2, 7)]
    assert b.groups[1].pad_index.tolist() == [[0, 1, 2], [3, 4, 5]]  # 5 = padding row of the group
    per_seg = b.split_logits(torch.arange(5.0)[:, None])
    assert [p.flatten().tolist() for p in per_seg] == [[2, 3, 4], [0], [], [1]]
    assert b.single_slot is None and build_batch([Segment([1, 2], 0, 4)], 5).single_slot == 4
    assert not b.one_token_each  # native CPU decode kernels only take batches of single-token segments
    assert build_batch([Segment([4], 7, 2), Segment([7], 0, 9)], 10).one_token_each


def test_conv_index_gathers_window_then_tokens():
    b = build_batch([Segment([1], 4, 3), Segment([1, 1, 1], 0, 0)], 4)
    taps, window, _, _ = reference.conv_index(b, 3)  # K = 3: windows are 2 rows each, stacked before the 4 tokens
    # segment 0 (decode): window rows 0, 1 then its token (row 4); segment 1: window rows 2, 3 then tokens 5..7
    assert taps.tolist() == [[0, 1, 4], [2, 3, 5], [3, 5, 6], [5, 6, 7]]
    assert window.tolist() == [[1, 4], [6, 7]]


def test_batch_tensors_pack_into_one_aligned_buffer():
    """What build_batch sends to a GPU in one copy: every tensor comes back equal, as a 16-byte aligned view."""
    segs = [Segment([1], 5, 0), Segment(list(range(7)), 0, 1), Segment([3, 4, 5], 9, 2, snapshot_slots=(5, 6))]
    b = build_batch(segs, 4, "cpu", 8)
    tensors = [getattr(b, f) for f in TENSOR_FIELDS] + [getattr(g, f) for g in b.groups for f in GROUP_FIELDS
                                                        if getattr(g, f) is not None]
    flat, starts = packed(tensors)
    views = unpacked(flat.clone(), starts, tensors)
    for t, v in zip(tensors, views):
        assert torch.equal(t, v) and t.dtype == v.dtype
        assert v.storage_offset() * v.element_size() % 16 == 0


def test_chunk_meta_indexes_every_chunk_of_the_prefill_segments():
    segs = [Segment([1], 5, 0), Segment(list(range(130)), 0, 1), Segment(list(range(64)), 64, 2),
            Segment(list(range(3)), 9, 3)]
    b = build_batch(segs, 4)
    cu, index = b.chunk_meta(1, 64)  # the three multi-token segments, counted from their first token
    assert cu.tolist() == [0, 130, 194, 197]
    assert index.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [2, 0]]
    assert b.chunk_meta(1, 64)[0] is cu  # built once per batch: every layer reads the same tensors


def test_prefill_graph_layout_pads_with_slotless_rows():
    """A step laid out for a prefill graph of D decode rows and T = bucket(prefill tokens): the decodes, padding
    rows in slot -1 up to D, the prefill segments in order, then a padding segment up to T in slot -1 (reset,
    positions from 0); the batch viewing the flat inputs has the cu_seqlens and chunk index build_batch gives the
    same segments (the padding ones on real slots there), and each segment's logits row."""
    assert [bucket(n) for n in (1, 16, 17, 129, 2048, 2049, 8192)] == [16, 16, 32, 192, 2048, 2560, 8192]
    assert [decode_rows(n) for n in (0, 1, 3, 9, 256, 257)] == [0, 1, 4, 16, 256, 320]
    segs = [Segment(list(range(100, 110)), 5, 3, 1), Segment([7], 40, 6), Segment(list(range(70)), 0, 1, 0)]
    shape, flat, where = layout(segs, 2, bucket(80))
    assert shape == (2, 96, 5, 4)  # 2 decode rows, 96 prefill tokens, 5 segments, chunks 1 + 2 + 1
    assert where == [2, 0, 3]
    batch = static_batch(shape, torch.from_numpy(flat), (8, 8), None)
    assert batch.input_ids.tolist() == [7, 0] + list(range(100, 110)) + list(range(70)) + [0] * 16
    assert batch.positions.tolist() == [40, 0] + list(range(5, 15)) + list(range(70)) + list(range(16))
    assert batch.token_slots.tolist() == [6, -1] + [3] * 10 + [1] * 70 + [-1] * 16
    assert batch.slots.tolist() == [6, -1, 3, 1, -1] and batch.reset.tolist() == [0, 1, 0, 1, 1]
    assert batch.token_segment.tolist() == [0, 1] + [2] * 10 + [3] * 70 + [4] * 16
    assert batch.logits_index.tolist() == [0, 1, 11, 81, 97]
    assert [g.kind for g in batch.groups] == ["decode", "prefill"] and batch.groups[1].slots.tolist() == [3, 1, -1]
    cu, index = batch.chunk_meta(2)
    same = build_batch([Segment([7], 40, 6), Segment([0], 0, 7)] + [segs[0], segs[2], Segment([0] * 16, 0, 0)], 8)
    assert cu.tolist() == same.chunk_meta(2)[0].tolist() == [0, 10, 80, 96]
    assert batch.token_segment.tolist() == same.token_segment.tolist()
    assert index.tolist() == same.chunk_meta(2)[1].tolist() == [[0, 0], [1, 0], [1, 1], [2, 0]]
    assert batch.cu_seqlens.tolist() == same.cu_seqlens.tolist()
    warm = static_batch(shape, slotless(shape, flat), (8, 8), None)  # the capture's warm-up: no slot's state
    assert set(warm.token_slots.tolist()) == set(warm.slots.tolist()) == {-1}
    for name in ("input_ids", "positions", "token_segment", "cu_seqlens", "reset", "logits_index"):
        assert torch.equal(getattr(warm, name), getattr(batch, name)), name
    shape, flat, where = layout([segs[0], segs[2]], 0, 80)  # no padding where the tokens fill the bucket
    assert shape == (0, 80, 2, 3) and where == [0, 1] and flat.size == 4 * 80 + 5 * 2 + 2 + 2 * 3


@pytest.mark.parametrize("segs,msg", [
    ([], "empty"),
    ([Segment([], 0, 0)], "no tokens"),
    ([Segment([1], 0, 4)], "out of range"),
    ([Segment([1], 0, 1), Segment([2], 3, 1)], "appears twice"),
    ([Segment([1], -1, 0)], "negative"),
    ([Segment([1, 2], 0, 0, num_logits=3)], "num_logits"),
])
def test_bad_batches_are_rejected(segs, msg):
    with pytest.raises(BatchError, match=msg):
        build_batch(segs, 4)


def test_decompose_interleaved_tokens():
    # seq 7 at positions 3,4,5 and seq 2 at 0,1 handed over interleaved
    segs, rows = decompose_tokens([10, 20, 11, 21, 12], [3, 0, 4, 1, 5], [7, 2, 7, 2, 7])
    assert segs == [(7, 3, [10, 11, 12]), (2, 0, [20, 21])]
    assert rows == [0, 3, 1, 4, 2]


@pytest.mark.parametrize("positions,msg", [([0, 2], "follows"), ([1, 0], "follows"), ([0, 0], "follows")])
def test_decompose_rejects_gaps_and_disorder(positions, msg):
    with pytest.raises(BatchError, match=msg):
        decompose_tokens([1, 2], positions, [0, 0])


def seq(rid, prompt_len, max_tokens=4):
    return Sequence(rid, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens), max_tokens)


def test_scheduler_budget_chunks_and_admission():
    s = Scheduler(SlotTable(2), max_num_batched_tokens=8, prefill_chunk=4)
    a, b, c = seq("a", 5), seq("b", 6), seq("c", 2)
    for x in (a, b, c):
        s.add(x)
    plan = s.schedule()
    assert [(x.request_id, n) for x, n in plan] == [("a", 4), ("b", 4)]  # c waits: no slot
    assert {a.slot, b.slot} == {0, 1} and c.status is Status.WAITING
    a.num_computed, b.num_computed = 4, 4
    plan = s.schedule()
    assert [(x.request_id, n) for x, n in plan] == [("a", 1), ("b", 2)]  # prompt ends
    a.num_computed, b.num_computed = 5, 6
    a.output_ids.append(9)  # a sampled its first token: it decodes now
    s.finish(b, "stop")
    assert b.slot is None and s.slots.available == 1
    plan = s.schedule()
    assert [(x.request_id, n) for x, n in plan] == [("a", 1), ("c", 2)]
    s.finish(c, "abort")
    assert not s.waiting and s.running == [a]


def test_prompt_split_points_do_not_depend_on_company():
    """A prompt is cut at multiples of prefill_chunk from its start; a chunk that does not fit waits."""
    s = Scheduler(SlotTable(4), max_num_batched_tokens=8, prefill_chunk=5)
    decoders = [seq(str(i), 1) for i in range(3)]
    long = seq("long", 12)
    for x in decoders:
        s.add(x)
    s.schedule()
    for x in decoders:
        x.num_computed = 1
        x.output_ids.append(0)
    s.add(long)
    assert [(x.request_id, n) for x, n in s.schedule()] == [("0", 1), ("1", 1), ("2", 1), ("long", 5)]
    long.num_computed = 5
    s.finish(decoders[0], "stop")
    assert [n for x, n in s.schedule() if x is long] == [5]  # 10, not 6: the split stays on the grid
    long.num_computed = 10
    assert [n for x, n in s.schedule() if x is long] == [2]


def test_a_branch_point_splits_the_prompt_once_more():
    """Chunks end at grid multiples, at the prompt's end, and at the sequence's branch point (kv_manager.py)."""
    s = Scheduler(SlotTable(1), max_num_batched_tokens=300, prefill_chunk=128)
    x = seq("x", 300)
    x.branch = 192
    s.add(x)
    cuts = []
    while x.num_computed < 300:
        (_, n), = s.schedule()
        x.num_computed += n
        cuts.append(x.num_computed)
    assert cuts == [128, 192, 256, 300]


def test_scheduler_rotates_decodes_when_budget_is_short():
    s = Scheduler(SlotTable(3), max_num_batched_tokens=3)
    seqs = [seq(str(i), 1) for i in range(3)]
    for x in seqs:
        s.add(x)
    s.schedule()  # admits all three
    s.budget = 2
    for x in seqs:
        x.num_computed = 1
        x.output_ids.append(0)
    served = [tuple(sorted(x.request_id for x, _ in s.schedule())) for _ in range(3)]
    counts = {r: sum(r in step for step in served) for r in "012"}
    assert set(counts.values()) == {2}  # each served twice in three steps


def test_waiting_request_can_be_finished():
    s = Scheduler(SlotTable(1), 4)
    a = seq("a", 2)
    s.add(a)
    s.finish(a, "abort")
    assert not s.has_unfinished() and a.finish_reason == "abort"
