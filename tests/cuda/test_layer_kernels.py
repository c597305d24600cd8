"""Attention over the KV cache, grouped MoE and the layers' row-wise glue on CUDA against float64 torch code.

Attention: decodes and varlen prefill chunks (1..300 tokens, some continuing earlier context) on
non-consecutive slots, padding rows with slot -1; KV slot S-1 holds NaN and every cache row the
batch does not write must come back bit for bit.
"""

import copy
import random
import types

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from deltaserve import kernels  # noqa: E402
from deltaserve.forward_batch import Segment, build_batch  # noqa: E402
from deltaserve.kernels import reference  # noqa: E402
from deltaserve.engine.prefill_graphs import bucket, layout, static_batch  # noqa: E402
from deltaserve.kernels.triton.attention import decode_attention, store_kv  # noqa: E402
from deltaserve.layers.feed_forward import SparseMoE  # noqa: E402
from deltaserve.layers.norm import GatedRMSNorm, RMSNorm  # noqa: E402
from deltaserve.layers.rotary import PartialRotary  # noqa: E402

S, M = 16, 512
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)


def attn_case(name: str):
    rng = random.Random(name)
    if name == "decodes":
        return [1] * 6, [0, 7, 2, 11, 5, 13], [4, 0, 300, 3, 129, 64]
    if name == "mixed":
        return [1, 65, 1, 3, 300, 129], [9, 1, 4, 10, 6, 0], [5, 0, 2, 0, 17, 64]
    n = 10  # varlen: random lengths 1..300 and starts, distinct random slots
    lens = [rng.randint(1, 300) for _ in range(n)]
    return lens, rng.sample(range(S - 1), n), [rng.randint(0, 200) for _ in range(n)]


def attn_inputs(t, h, g, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(t, h, d, generator=gen)
    kv = torch.randn(t, 2 * g * d + 8, generator=gen)  # k, v as strided views, like the layer's split
    caches = torch.randn(2, S, M, g, d, generator=gen)
    caches[:, S - 1] = float("nan")
    ref = [x.to(dtype).double() for x in (q, kv, caches)]
    dev = [x.to(dtype).cuda() for x in (q, kv, caches)]
    return ref, dev


def split_kv(kv, g, d):
    return kv[:, :g * d].view(-1, g, d), kv[:, g * d:2 * g * d].view(-1, g, d)


@DTYPES
@pytest.mark.parametrize("h,g,d", [(8, 2, 256), (4, 2, 16)], ids=str)
@pytest.mark.parametrize("case", ["decodes", "mixed", "varlen"])
def test_attention_matches_reference(case, h, g, d, dtype, check):
    lens, slots, starts = attn_case(case)
    segs = [Segment([0] * n, s0, slot) for n, slot, s0 in zip(lens, slots, starts)]
    (q, kv, caches), (dq, dkv, dcaches) = attn_inputs(sum(lens), h, g, d, dtype, seed=len(case) + d)
    before = dcaches.clone()
    ref_batch = build_batch(segs, S)
    ref = reference.attention(q, *split_kv(kv, g, d), caches[0], caches[1], ref_batch, d ** -0.5,
                              ref_batch.blocks_for(caches[0]))
    batch = build_batch(segs, S, "cuda")
    out = kernels.attention(dq, *split_kv(dkv, g, d), dcaches[0], dcaches[1], batch, d ** -0.5)
    check(f"attention {case} h{h} g{g} d{d} {dtype}", out, ref, TOL[dtype])
    written = torch.zeros(S, M, dtype=torch.bool)
    written[batch.token_slots.cpu(), batch.positions.cpu()] = True
    torch.testing.assert_close(dcaches.cpu()[:, written], caches[:, written].to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(dcaches.cpu()[:, ~written], before.cpu()[:, ~written], rtol=0, atol=0, equal_nan=True)


@DTYPES
@pytest.mark.parametrize("case", ["decodes", "mixed", "varlen"])
def test_paged_attention_matches_reference(case, dtype, check):
    """KV in blocks of 16 positions, each slot's blocks scattered over the pool in a random order."""
    h, g, d, bs = 8, 2, 128, 16
    lens, slots, starts = attn_case(case)
    mb = M // bs
    gen = torch.Generator().manual_seed(5)
    table = torch.randperm(S * mb, generator=gen).view(S, mb).to(torch.int32)
    segs = [Segment([0] * n, s0, slot) for n, slot, s0 in zip(lens, slots, starts)]
    (q, kv, caches), (dq, dkv, dcaches) = attn_inputs(sum(lens), h, g, d, dtype, seed=11)
    caches, dcaches = (c.nan_to_num().reshape(2, S * mb, bs, g, d) for c in (caches, dcaches))  # no NaN slot here
    ref = reference.attention(q, *split_kv(kv, g, d), caches[0], caches[1], build_batch(segs, S), d ** -0.5, table)
    batch = build_batch(segs, S, "cuda", block_table=table.cuda())
    out = kernels.attention(dq, *split_kv(dkv, g, d), dcaches[0], dcaches[1], batch, d ** -0.5)
    check(f"paged attention {case} {dtype}", out, ref, TOL[dtype])
    torch.testing.assert_close(dcaches.cpu(), caches.to(dtype), rtol=0, atol=0, equal_nan=True)


@DTYPES
def test_decode_attention_padding_rows(dtype, check):
    h, g, d = 8, 2, 256
    lens, slots, starts = attn_case("decodes")
    n, pad = len(lens), 3
    segs = [Segment([0], s0, slot) for slot, s0 in zip(slots, starts)]
    (q, kv, caches), (dq, dkv, dcaches) = attn_inputs(n + pad, h, g, d, dtype, seed=3)
    before = dcaches.clone()
    ref_batch = build_batch(segs, S)
    ref = reference.attention(q[:n], *split_kv(kv[:n], g, d), caches[0], caches[1], ref_batch, d ** -0.5,
                              ref_batch.blocks_for(caches[0]))
    batch = build_batch(segs, S, "cuda")
    pad_slots = torch.cat([batch.slots, batch.slots.new_full((pad,), -1)])
    positions = torch.cat([batch.positions, batch.positions.new_zeros(pad)])
    table = batch.blocks_for(dcaches[0])  # one block of M positions per slot
    store_kv(*split_kv(dkv, g, d), dcaches[0], dcaches[1], table, pad_slots, positions)
    out = decode_attention(dq, dcaches[0], dcaches[1], table, pad_slots, positions, d ** -0.5)
    check(f"padded decode attention {dtype}", out[:n], ref, TOL[dtype])
    assert torch.equal(out[n:].cpu(), torch.zeros(pad, h, d, dtype=dtype))
    untouched = [x for x in range(S) if x not in slots]
    torch.testing.assert_close(dcaches[:, untouched].cpu(), before[:, untouched].cpu(), rtol=0, atol=0, equal_nan=True)


@DTYPES
def test_prefill_attention_padding_rows(dtype, check):
    """A prefill-graph batch (engine/prefill_graphs.py) of the "mixed" segments: its 2 decodes, 2 padding decode rows
    in slot -1, its prefill segments, a padding segment up to the bucket in slot -1. The real rows equal the
    reference, the padding rows are zeros, no other slot changes."""
    h, g, d = 8, 2, 256
    lens, slots, starts = attn_case("mixed")
    segs = [Segment([0] * n, s0, slot) for n, slot, s0 in zip(lens, slots, starts)]
    t = sum(lens)
    shape, flat, _ = layout(segs, 4, bucket(t - 2))
    real = [0, 1] + list(range(4, t + 2))  # rows of the real tokens, in build_batch's order (decodes first)
    (q, kv, caches), (dq, dkv, dcaches) = attn_inputs(shape[0] + shape[1], h, g, d, dtype, seed=4)
    before = dcaches.clone()
    ref_batch = build_batch(segs, S)
    ref = reference.attention(q[real], *split_kv(kv[real], g, d), caches[0], caches[1], ref_batch, d ** -0.5,
                              ref_batch.blocks_for(caches[0]))
    batch = static_batch(shape, torch.from_numpy(flat).cuda(), (S, S), None)
    out = kernels.attention(dq, *split_kv(dkv, g, d), dcaches[0], dcaches[1], batch, d ** -0.5)
    check(f"padded prefill attention {dtype}", out[real], ref, TOL[dtype])
    pad = [r for r in range(out.shape[0]) if r not in real]
    assert torch.equal(out[pad].cpu(), torch.zeros(len(pad), h, d, dtype=dtype))
    untouched = [x for x in range(S) if x not in slots]
    torch.testing.assert_close(dcaches[:, untouched].cpu(), before[:, untouched].cpu(), rtol=0, atol=0, equal_nan=True)


@DTYPES
@pytest.mark.parametrize("t,e,k,s", [(1, 256, 10, 96), (2, 512, 10, 96), (64, 512, 10, 96), (37, 16, 4, 96),
                                     (300, 64, 8, 96), (1, 512, 10, 64), (3, 64, 8, 64), (8, 512, 10, 64),
                                     (9, 512, 10, 64)], ids=str)
def test_sparse_moe_matches_cpu_block(t, e, k, s, dtype, check, note):
    """The whole MoE block (routing, grouped experts, shared expert) against SparseMoE's CPU code in float64
    with its router logits rounded to the model dtype, as every implementation of a bf16 model has them.
    Router weights x10 make routing decisive; it also makes logits of |30-45|, where bf16 rounding alone moves
    the softmax weights (and the block's output) by ~1.2e-2 relative against unrounded float64 logits.
    The rounded logits may still differ by one ulp (cuBLAS's float32 sum vs float64), so a token whose k-th
    and (k+1)-th logits lie within 2^-7 of each other may pick another expert: such tokens are left out
    and counted. Shared width s = 64 = the expert width at t <= 8 takes the per-pair GEMV path (moe_pairs.few_tokens),
    whose tokens are computed independently: there each token's row must equal its solo run bit for bit."""
    d, i = 256, 64
    cfg = types.SimpleNamespace(num_experts=e, moe_intermediate_size=i, hidden_size=d, top_k=k,
                                norm_topk_prob=True, shared_expert_intermediate_size=s)
    gen = torch.Generator().manual_seed(t + e + s + 1)
    moe = SparseMoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        moe.router.weight.mul_(10)
        x = torch.randn(t, d, generator=gen)
        ref_moe = copy.deepcopy(moe).to(dtype).double()
        top = ref_moe.router(x.to(dtype).double()).topk(k + 1).values  # router logits, float64
        ref_moe.router.register_forward_hook(lambda mod, args, out: out.to(dtype).double())
        ref = ref_moe(x.to(dtype).double())
        c_moe = copy.deepcopy(moe).to(dtype).cuda()
        got = kernels.sparse_moe(x.to(dtype).cuda(), c_moe)
        if s == i and t <= 8:
            from deltaserve.kernels.triton.moe_pairs import PAIR_GEMV_TOKENS
            assert t <= PAIR_GEMV_TOKENS
            for j in range(t):
                assert torch.equal(kernels.sparse_moe(x[j:j + 1].to(dtype).cuda(), c_moe)[0], got[j])
    near = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -18
    keep = top[:, k - 1] - top[:, k] > near * top[:, k - 1:k + 1].abs().max(-1).values
    note(f"moe t{t} e{e} k{k} {dtype}: {int((~keep).sum())} of {t} tokens routed on a near-tie, left out")
    assert keep.any()
    check(f"moe block t{t} e{e} k{k} {dtype}", got[keep.cuda()], ref[keep], TOL[dtype])


@DTYPES
def test_rowwise_glue_matches_layers(dtype, check):
    """Norms, residual add + norm, q/k norm + rotary, SwiGLU and the attention gate: CUDA vs the CPU code."""
    gen = torch.Generator().manual_seed(5)
    norm, gated, rotary = RMSNorm(256, 1e-6), GatedRMSNorm(128, 1e-6), PartialRotary(64, 1e7)
    norm.weight.data, gated.weight.data = torch.randn(256, generator=gen), torch.randn(128, generator=gen)
    x = torch.randn(37, 3 * 256 + 5, generator=gen)[:, :768].view(37, 3, 256)  # strided rows, like q of qkv_proj
    o, z = torch.randn(37, 4, 128, generator=gen), torch.randn(37, 600, generator=gen)[:, :512].view(37, 4, 128)
    y, h = torch.randn(37, 256, generator=gen), torch.randn(37, 2 * 384, generator=gen)
    positions = torch.randint(0, 4096, (37,), generator=gen)
    c_norm, c_gated = copy.deepcopy(norm).to(dtype).cuda(), copy.deepcopy(gated).to(dtype).cuda()
    r_norm, r_gated = norm.double(), gated.double()

    def dev(t):
        return t.to(dtype).cuda()

    def ref(t):
        return t.to(dtype).double()

    with torch.no_grad():
        cases = [
            ("rmsnorm [T, H, D]", c_norm(dev(x)), r_norm(ref(x))),
            ("rmsnorm [T, D]", c_norm(dev(x[:, 0])), r_norm(ref(x[:, 0]))),
            ("gated rmsnorm", c_gated(dev(o), dev(z)), r_gated(ref(o), ref(z))),
            ("add + rmsnorm: sum", kernels.add_rms_norm(dev(x[:, 0]).contiguous(), dev(y), c_norm)[0],
             ref(x[:, 0]) + ref(y)),
            ("add + rmsnorm: norm", kernels.add_rms_norm(dev(x[:, 0]).contiguous(), dev(y), c_norm)[1],
             r_norm((ref(x[:, 0]) + ref(y)).to(dtype).double())),
            ("q/k norm + rotary", kernels.norm_rotary(dev(x), c_norm, rotary, positions.cuda()),
             rotary(r_norm(ref(x)), positions)),
            ("silu * up", kernels.silu_mul(dev(h)), kernels.silu_mul(ref(h))),
            ("x * sigmoid(gate)", kernels.sigmoid_gate(dev(o), dev(z)), kernels.sigmoid_gate(ref(o), ref(z))),
        ]
    for name, got, want in cases:
        check(f"{name} {dtype}", got, want, TOL[dtype])


@pytest.mark.parametrize("n,k", [(8224, 2048), (2048, 6144), (1, 2048), (37, 512), (100, 384)], ids=str)
def test_one_row_linear_matches_float64(n, k, check):
    """The Triton GEMV (one bf16 row) against float64; rows past N and K not a multiple of 512 included."""
    from deltaserve.kernels.triton.linear import linear
    gen = torch.Generator().manual_seed(n + k)
    x, w = torch.randn(1, k, generator=gen), torch.randn(n, k, generator=gen)
    out = linear(x.to(torch.bfloat16).cuda(), w.to(torch.bfloat16).cuda())
    assert out.shape == (1, n) and out.dtype == torch.bfloat16
    check(f"one-row linear n{n} k{k} bfloat16", out, x.to(torch.bfloat16).double() @ w.to(torch.bfloat16).double().T,
          TOL[torch.bfloat16])


@pytest.mark.parametrize("i,k", [(6144, 2048), (512, 2048), (37, 384)], ids=str)
def test_swiglu_gemv_matches_float64(i, k, check):
    """The MLP's one-row input half (gate_up GEMV, SiLU(gate) * up in its epilogue) against float64, into a
    NaN-poisoned output at both row blocks; I not a multiple of the block included; then the whole MLP layer."""
    from deltaserve.kernels.triton.linear import gemv
    from deltaserve.layers.feed_forward import MLP
    bf16 = torch.bfloat16
    gen = torch.Generator().manual_seed(i + k)
    mlp = MLP(k, i)
    mlp.gate_up.weight.data = torch.randn(2 * i, k, generator=gen)
    mlp.down.weight.data = torch.randn(k, i, generator=gen)
    x = torch.randn(1, k, generator=gen).to(bf16)
    ref_mlp = copy.deepcopy(mlp).to(bf16).double()  # CPU: the product, then silu_mul
    gate, up = (x.double() @ ref_mlp.gate_up.weight.T).chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    c_mlp = copy.deepcopy(mlp).to(bf16).cuda()  # its Linears reach the Triton GEMV through kernels.linear
    xc, wc = x.cuda(), c_mlp.gate_up.weight
    with torch.no_grad():
        got = kernels.swiglu_gemv(xc, wc)
        assert got is not None and got.shape == (1, i) and got.dtype == bf16
        check(f"swiglu gemv i{i} k{k} bfloat16", got, ref, TOL[bf16])
        for bn in (1, 2):
            out = torch.full((1, i), float("nan"), dtype=bf16, device="cuda")
            gemv(xc, wc, out, bn=bn, bk=1024 if k % 1024 == 0 else 128, swiglu=True)
            check(f"swiglu gemv i{i} k{k} bn{bn} bfloat16", out, ref, TOL[bf16])
        check(f"mlp one row i{i} k{k} bfloat16", c_mlp(xc), ref_mlp(x.double()), TOL[bf16])


@pytest.mark.parametrize("i,k", [(3584, 1024), (512, 2048), (37, 384)], ids=str)
def test_add_norm_swiglu_matches_separate_kernels(i, k, check, monkeypatch):
    """The residual add + RMSNorm in the SwiGLU GEMV's prologue (one launch) against the add + norm kernel and then
    the SwiGLU GEMV: the same residual stream and MLP input half bit for bit (a row alone takes the fused launch,
    rows among others the two kernels: a sequence's result must not depend on that)."""
    from deltaserve.kernels.triton import linear
    monkeypatch.setattr(linear, "ADD_NORM_PROLOGUE", True)
    bf16 = torch.bfloat16
    gen = torch.Generator().manual_seed(i + k)
    x, y = (torch.randn(1, k, generator=gen).to(bf16).cuda() for _ in range(2))
    norm = RMSNorm(k, 1e-6).cuda()
    norm.weight.data = (torch.randn(k, generator=gen) * 0.1).to(bf16).cuda()
    w = (torch.randn(2 * i, k, generator=gen) / k ** 0.5).to(bf16).cuda()
    with torch.no_grad():
        total, h = kernels.add_rms_norm(x, y, norm)
        want = kernels.swiglu_gemv(h, w)
        got = kernels.add_norm_swiglu(x, y, norm, w)
        assert got is not None and torch.equal(got[0], total) and torch.equal(got[1], want)


@pytest.mark.parametrize("h,dh,n", [(16, 128, 2048), (32, 128, 2048), (3, 128, 100), (4, 256, 2048)], ids=str)
def test_norm_gate_gemv_matches_float64(h, dh, n, check):
    """One row: the delta-rule gated norm (per head of dh) or the attention's sigmoid gate (the gate a strided
    view of qg, as the layer splits it) in the out-projection GEMV's prologue, against float64 of the separate
    kernels (their bf16 output rounded, as they store it), into fresh outputs; N not a multiple of the block."""
    from deltaserve.kernels.triton.linear import norm_gemv
    bf16 = torch.bfloat16
    gen = torch.Generator().manual_seed(h * dh + n)
    x, w = torch.randn(1, h * dh, generator=gen).to(bf16), torch.randn(n, h * dh, generator=gen).to(bf16)
    zz = torch.randn(1, 3 * h * dh, generator=gen).to(bf16)
    z = zz[:, h * dh:2 * h * dh]  # a column slice, as in_proj's split gives it
    nw = torch.randn(dh, generator=gen).to(bf16)
    qg = torch.randn(1, h, 2 * dh, generator=gen).to(bf16)
    gate = qg[..., dh:]
    gated = GatedRMSNorm(dh, 1e-6)
    gated.weight.data = nw.clone()
    normed = gated.double()(x.double().view(1, h, dh), z.double().view(1, h, dh)).to(bf16).double().view(1, -1)
    gated_in = (x.double().view(1, h, dh) * torch.sigmoid(gate.double())).to(bf16).double().view(1, -1)
    with torch.no_grad():
        got = norm_gemv(x.cuda(), z.cuda(), nw.cuda(), 1e-6, w.cuda())
        assert got is not None and got.shape == (1, n) and got.dtype == bf16
        check(f"gated norm + gemv h{h} dh{dh} n{n} bfloat16", got, normed @ w.double().T, TOL[bf16])
        got = norm_gemv(x.cuda(), gate.cuda(), gate.cuda(), 0., w.cuda(), gated=False)
        assert got is not None
        check(f"sigmoid gate + gemv h{h} dh{dh} n{n} bfloat16", got, gated_in @ w.double().T, TOL[bf16])
