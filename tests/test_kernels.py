"""Reference kernels against naive per-token / per-segment loops, over varlen batches and slots."""

import pytest
import torch
import torch.nn.functional as F

from deltaserve.engine.batch import Segment, build_batch
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
        batch = build_batch(segs, 2)
        hidden = model(batch, HybridCache(cfg, 2, 80, torch.float32))
        model.logits(hidden[batch.logits_index]).logsumexp(-1).mean().backward()
        no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
        assert no_grad == []
