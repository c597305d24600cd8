"""The CPU decode-only delta rule (kernels/cpu_decode.py) against the reference, on random inputs."""

import pytest
import torch

from deltaserve.engine.batch import Segment, build_batch
from deltaserve.kernels.cpu_decode import gated_delta_decode
from deltaserve.kernels.reference import gated_delta_rule

S, HK, H, DK, DV = 12, 2, 4, 16, 8

CASES = {  # (slots, start positions): 0 resets the slot
    "one": ([5], [9]),
    "one-reset": ([5], [0]),
    "consecutive": ([2, 3, 4, 5], [4, 1, 7, 2]),
    "scattered": ([7, 0, 11, 3], [4, 0, 11, 2]),
    "all-slots": (list(range(S)), list(range(1, S + 1))),
}


def inputs(b: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, HK, DK, generator=g), torch.randn(b, HK, DK, generator=g)
    v = torch.randn(b, H, DV, generator=g)
    decay = -torch.rand(b, H, generator=g) * 2  # log decay
    beta = torch.rand(b, H, generator=g)
    pool = torch.randn(S, H, DK, DV, generator=g)
    return q, k, v, decay, beta, pool


@pytest.mark.parametrize("case", CASES, ids=str)
def test_decode_matches_reference(case):
    slots, starts = CASES[case]
    q, k, v, g, beta, pool = inputs(len(slots), seed=len(case))
    ref_pool, fast_pool = pool.clone(), pool.clone()
    batch = build_batch([Segment([0], p, s) for s, p in zip(slots, starts)], S)
    order = [slots.index(s) for s in batch.slot_ids]  # the batch's segment order
    q, k, v, g, beta = (x[order] for x in (q, k, v, g, beta))
    with torch.inference_mode():
        ref = gated_delta_rule(q, k, v, g, beta, ref_pool, batch)
        out = gated_delta_decode(q, k, v, g, beta, fast_pool, batch.slot_ids, [p == 0 for p in batch.start_pos])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_pool, ref_pool, rtol=1e-5, atol=1e-5)


def test_decode_row_independent_of_batch():
    """A sequence alone, in a consecutive batch and in a scattered one: same output and state to 1e-6."""
    q, k, v, g, beta, pool = inputs(4, seed=3)
    alone_pool = pool.clone()
    alone = gated_delta_decode(q[:1], k[:1], v[:1], g[:1], beta[:1], alone_pool, [6], [False])
    for slots in ([6, 7, 8, 9], [6, 1, 10, 3]):
        p = pool.clone()
        out = gated_delta_decode(q, k, v, g, beta, p, slots, [False] * 4)
        torch.testing.assert_close(out[:1], alone, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(p[6], alone_pool[6], rtol=1e-6, atol=1e-6)
