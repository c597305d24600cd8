"""Reference kernels against naive per-token / per-segment loops, over varlen batches and slots."""

import pytest
import torch
import torch.nn.functional as F

from deltaserve.forward_batch import Segment, build_batch
from deltaserve.kernels.reference import causal_conv, gated_delta_rule, l2norm

NUM_SLOTS = 12


def naive_delta_rule(q, k, v, g, beta, state):
    """Token-by-token gated delta rule for one sequence. q, k [T, Hk, Dk]; v [T, H, Dv]; state [H, Dk, Dv]."""
    rep = v.shape[1] // k.shape[1]
    q = l2norm(q).repeat_interleave(rep, 1) * q.shape[-1] ** -0.5
    k = l2norm(k).repeat_interleave(rep, 1)
    out = []
    for t in range(q.shape[0]):
        state = state * g[t].exp()[:, None, None]
        err = v[t] - torch.einsum("hk,hkv->hv", k[t], state)
        state = state + k[t][:, :, None] * (beta[t][:, None] * err)[:, None, :]
        out.append(torch.einsum("hk,hkv->hv", q[t], state))
    return torch.stack(out), state


def make_batch(lens, slots, starts):
    segs = [Segment([0] * n, s0, slot) for n, slot, s0 in zip(lens, slots, starts)]
    return build_batch(segs, NUM_SLOTS)


CASES = {
    "one-decode": ([1], [5], [9]),
    "one-prefill": ([150], [3], [0]),
    "decodes": ([1, 1, 1], [0, 7, 2], [4, 0, 11]),
    "mixed": ([1, 65, 1, 3, 300], [9, 1, 4, 10, 6], [5, 0, 2, 0, 17]),
    "prefills": ([2, 64, 129], [11, 0, 5], [3, 0, 70]),
}


@pytest.mark.parametrize("hk,h,dk,dv", [(2, 2, 16, 16), (2, 4, 8, 16), (1, 3, 16, 8)], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gated_delta_rule_matches_naive(case, hk, h, dk, dv):
    lens, slots, starts = CASES[case]
    torch.manual_seed(0)
    t = sum(lens)
    q, k = torch.randn(t, hk, dk), torch.randn(t, hk, dk)
    v = torch.randn(t, h, dv)
    g = -torch.rand(t, h) * 2
    beta = torch.rand(t, h)
    pool = torch.randn(NUM_SLOTS, h, dk, dv)
    before = pool.clone()
    batch = make_batch(lens, slots, starts)
    out = gated_delta_rule(q, k, v, g, beta, pool, batch)
    # batch order is decodes first: compare each segment by its own rows
    for j, orig in enumerate(batch.order):
        rows = slice(int(batch.cu_seqlens[j]), int(batch.cu_seqlens[j + 1]))
        init = torch.zeros(h, dk, dv) if starts[orig] == 0 else before[slots[orig]]
        ref_out, ref_state = naive_delta_rule(q[rows], k[rows], v[rows], g[rows], beta[rows], init)
        torch.testing.assert_close(out[rows], ref_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pool[slots[orig]], ref_state, rtol=1e-5, atol=1e-5)
    untouched = [s for s in range(NUM_SLOTS) if s not in slots]
    assert torch.equal(pool[untouched], before[untouched])


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("kernel", [2, 4])
def test_causal_conv_matches_per_segment_conv(case, kernel):
    lens, slots, starts = CASES[case]
    torch.manual_seed(1)
    c = 10
    x = torch.randn(sum(lens), c)
    weight = torch.randn(c, kernel)
    pool = torch.randn(NUM_SLOTS, kernel - 1, c)
    before = pool.clone()
    batch = make_batch(lens, slots, starts)
    out = causal_conv(x, weight, pool, batch)
    for j, orig in enumerate(batch.order):
        rows = slice(int(batch.cu_seqlens[j]), int(batch.cu_seqlens[j + 1]))
        window = torch.zeros(kernel - 1, c) if starts[orig] == 0 else before[slots[orig]]
        ext = torch.cat([window, x[rows]])
        ref = F.silu(F.conv1d(ext.t()[None], weight[:, None], groups=c)[0].t())
        torch.testing.assert_close(out[rows], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pool[slots[orig]], ext[-(kernel - 1):])
    untouched = [s for s in range(NUM_SLOTS) if s not in slots]
    assert torch.equal(pool[untouched], before[untouched])


def test_single_sequence_path_updates_the_slot_in_place():
    """One sequence: the state is read and written through a view of its slot (no copy of the pool)."""
    pool = torch.randn(NUM_SLOTS, 2, 4, 4)
    ptr = pool[7].data_ptr()
    batch = make_batch([1], [7], [3])
    before = pool.clone()
    gated_delta_rule(torch.randn(1, 2, 4), torch.randn(1, 2, 4), torch.randn(1, 2, 4), -torch.rand(1, 2),
                     torch.rand(1, 2), pool, batch)
    assert pool[7].data_ptr() == ptr and not torch.equal(pool[7], before[7])
    assert torch.equal(pool[:7], before[:7]) and torch.equal(pool[8:], before[8:])


def test_model_forward_is_differentiable(tiny_dirs):
    """Training runs the engine's own forward: gradients must reach every parameter through the kernels."""
    from deltaserve.cache.state_cache import HybridCache
    from deltaserve.weights.loader import load_model

    model, cfg = load_model(tiny_dirs["qwen3_next"])
    for segs in ([Segment(list(range(1, 70)), 0, 0, 69)],
                 [Segment(list(range(1, 70)), 0, 0, 69), Segment(list(range(5, 74)), 0, 1, 69)]):
        model.zero_grad()
        cache = HybridCache(cfg, 2, 80, torch.float32)
        batch = build_batch(segs, 2, block_table=cache.block_table)
        hidden = model(batch, cache)
        model.logits(hidden[batch.logits_index]).logsumexp(-1).mean().backward()
        no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
        assert no_grad == []


def test_verify_segments_keep_the_state_after_every_token():
    """Speculative verify: segment states after each token land in snapshot slots, the last in the slot."""
    torch.manual_seed(3)
    hk, h, dk, dv, c, kw = 2, 4, 8, 8, 6, 4
    segs = [Segment([0], 5, 0), Segment([0] * 4, 7, 1, snapshot_slots=(8, 9, 10)),
            Segment([0] * 3, 0, 2, snapshot_slots=(11, 12)), Segment([0] * 20, 0, 3)]
    batch = build_batch(segs, 8, num_state_slots=16)
    assert [g.kind for g in batch.groups] == ["decode", "verify", "prefill"] and batch.single_slot is None
    t = sum(len(s.token_ids) for s in segs)
    q, k, v = torch.randn(t, hk, dk), torch.randn(t, hk, dk), torch.randn(t, h, dv)
    g, beta, x = -torch.rand(t, h), torch.rand(t, h), torch.randn(t, c)
    pool, conv_pool, weight = torch.randn(16, h, dk, dv), torch.randn(16, kw - 1, c), torch.randn(c, kw)
    before, conv_before = pool.clone(), conv_pool.clone()
    out = gated_delta_rule(q, k, v, g, beta, pool, batch)
    conv_out = causal_conv(x, weight, conv_pool, batch)
    for j, orig in enumerate(batch.order):
        seg = segs[orig]
        rows = slice(int(batch.cu_seqlens[j]), int(batch.cu_seqlens[j + 1]))
        state = torch.zeros(h, dk, dv) if seg.start_pos == 0 else before[seg.slot]
        window = torch.zeros(kw - 1, c) if seg.start_pos == 0 else conv_before[seg.slot]
        ext = torch.cat([window, x[rows]])
        for i in range(len(seg.token_ids)):  # token by token, the naive way
            o, state = naive_delta_rule(q[rows][i:i + 1], k[rows][i:i + 1], v[rows][i:i + 1], g[rows][i:i + 1],
                                        beta[rows][i:i + 1], state)
            torch.testing.assert_close(out[rows][i], o[0], rtol=1e-5, atol=1e-5)
            if i < len(seg.snapshot_slots):
                torch.testing.assert_close(pool[seg.snapshot_slots[i]], state, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(conv_pool[seg.snapshot_slots[i]], ext[i + 1:i + kw])
        torch.testing.assert_close(pool[seg.slot], state, rtol=1e-5, atol=1e-5)
        ref = F.silu(F.conv1d(ext.t()[None], weight[:, None], groups=c)[0].t())
        torch.testing.assert_close(conv_out[rows], ref, rtol=1e-5, atol=1e-5)
    untouched = [4, 5, 6, 7, 13, 14, 15]
    assert torch.equal(pool[untouched], before[untouched]) and torch.equal(conv_pool[untouched], conv_before[untouched])
