"""The C++ CPU kernels (kernels/csrc/cpu_ops.cpp) on float weights against the torch code they replace, on random
inputs (quantized weights: test_cpu_quantized.py).

Each kernel: matches the torch path to 1e-5, leaves other slots untouched (poisoned with NaN), and gives
a row / sequence bit-identical results alone and inside any batch (the engine's invariant).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from deltaserve import kernels
from deltaserve.config import ModelConfig
from deltaserve.forward_batch import Segment, build_batch
from deltaserve.kernels import cpu_native
from deltaserve.layers.attention import GatedAttention
from deltaserve.layers.cpu_packed import pack_for_cpu, pack_weights
from deltaserve.layers.feed_forward import SparseMoE
from deltaserve.layers.gated_deltanet import GatedDeltaNet
from tiny_models import tiny_config

pytestmark = pytest.mark.skipif(cpu_native.ops() is None, reason="no C++ toolchain to build the CPU kernels")



@pytest.mark.parametrize("rows", [1, 2, 3, 5, 9, 17, 130])
@pytest.mark.parametrize("shape", [(1, 16), (33, 100), (130, 64), (257, 1030)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_packed_linear_matches_f_linear(rows, shape, dtype, threads):
    """Float weights packed as they are (bf16 / f16 kept, no copy in another dtype): the exact product."""
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(shape, generator=g) / shape[1] ** 0.5).to(dtype)
    x = torch.randn(rows, shape[1], generator=g)
    packed = cpu_native.pack(w)
    assert packed.nbytes == -(-shape[0] // 16) * 16 * shape[1] * w.element_size()  # rows padded to 16 only
    out = cpu_native.linear(x, packed)
    torch.testing.assert_close(out, F.linear(x, w.float()), rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.rows(0, torch.arange(shape[0])), w.float())
    for r in range(rows):  # each row alone: bit-identical
        assert torch.equal(cpu_native.linear(x[r:r + 1], packed), out[r:r + 1])


def test_packed_linear_checks_its_input():
    packed = cpu_native.pack(torch.randn(8, 32))
    with pytest.raises(RuntimeError, match=r"linear: x must be float32 \[T, 32\]"):
        cpu_native.linear(torch.randn(2, 16), packed)


def moe_module(seed: int, **overrides) -> SparseMoE:
    cfg = ModelConfig.from_dict(tiny_config("qwen3_next", model_type="qwen3_next", **overrides))
    torch.manual_seed(seed)
    moe = SparseMoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return moe


@pytest.mark.parametrize("tokens", [1, 3, 8, 16, 70])
@pytest.mark.parametrize("dims", [(8, 2, 32, 48), (32, 4, 100, 64)], ids=lambda d: "E{}K{}I{}Is{}".format(*d))
def test_moe_block_matches_torch_path(tokens, dims, threads, monkeypatch):
    e, k, i, i_shared = dims
    moe = moe_module(tokens, num_experts=e, num_experts_per_tok=k, moe_intermediate_size=i,
                     shared_expert_intermediate_size=i_shared, norm_topk_prob=tokens % 2 == 1)
    x = torch.randn(tokens, moe.router.in_features)
    plain = copy.deepcopy(moe)
    pack_weights(moe)
    with torch.no_grad():
        out = moe(x)
        singles = [moe(x[t:t + 1]) for t in range(tokens)]
        torch.testing.assert_close(out, plain(x), rtol=1e-5, atol=1e-5)
    for t in range(tokens):  # each token alone: bit-identical
        assert torch.equal(singles[t], out[t:t + 1])


@pytest.mark.parametrize("shape", [(1, 64), (5, 3, 16), (7, 1000)], ids=str)
def test_add_rms_norm_matches_torch(shape):
    x, y, w = torch.randn(shape), torch.randn(shape), torch.randn(shape[-1])
    total, out = cpu_native.add_rms_norm(x, y, w, 1e-6)
    ref = (x + y) * torch.rsqrt((x + y).pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + w)
    torch.testing.assert_close(total, x + y)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    alone = cpu_native.add_rms_norm(total.reshape(-1, shape[-1])[:1], None, w, 1e-6)[1]
    assert torch.equal(alone, cpu_native.add_rms_norm(total, None, w, 1e-6)[1].reshape(-1, shape[-1])[:1])


S = 12
CASES = {  # (slots, start positions): 0 resets the slot
    "one": ([5], [9]),
    "one-reset": ([5], [0]),
    "consecutive": ([2, 3, 4, 5], [4, 1, 7, 2]),
    "scattered": ([7, 0, 11, 3], [4, 0, 11, 2]),
    "all-slots": (list(range(S)), list(range(1, S + 1))),
}


def gdn_layer(arch="qwen3_next", **overrides):
    cfg = ModelConfig.from_dict(tiny_config(arch, model_type=arch, **overrides))
    torch.manual_seed(1)
    layer = GatedDeltaNet(cfg).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    conv = torch.randn(S, cfg.conv_kernel - 1, cfg.conv_dim)
    ssm = torch.randn(S, cfg.num_v_heads, cfg.k_head_dim, cfg.v_head_dim)
    return layer, conv, ssm


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("heads", [(2, 4), (4, 4)], ids=["grouped", "equal"])
def test_gdn_decode_matches_torch_path(case, heads, threads, monkeypatch):
    slots, starts = CASES[case]
    layer, conv, ssm = gdn_layer(linear_num_key_heads=heads[0], linear_num_value_heads=heads[1])
    unused = [s for s in range(S) if s not in slots]
    conv[unused], ssm[unused] = float("nan"), float("nan")  # poison: must stay untouched
    batch = build_batch([Segment([0], p, s) for s, p in zip(slots, starts)], S)
    x = torch.randn(len(slots), layer.in_proj.in_features)
    ref_conv, ref_ssm = conv.clone(), ssm.clone()
    with torch.no_grad():
        out = layer(x, batch, (conv, ssm))
        monkeypatch.setattr(kernels, "gated_delta_net_decode", lambda *a: None)
        ref = layer(x, batch, (ref_conv, ref_ssm))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv, ref_conv, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(ssm, ref_ssm, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert ssm[unused].isnan().all() and conv[unused].isnan().all()


def test_gdn_decode_sequence_independent_of_batch():
    """Slot 6 alone, in a consecutive batch and a scattered one: bit-identical output and state."""
    layer, conv, ssm = gdn_layer()
    with torch.no_grad():
        proj = layer.in_proj(torch.randn(4, layer.in_proj.in_features))
    parts = proj.split([layer.conv_weight.shape[0], layer.value_dim, layer.h, layer.h], dim=-1)  # mixed, z, b, a
    results = []
    for slots in ([6], [6, 7, 8, 9], [6, 1, 10, 3]):
        c, s = conv.clone(), ssm.clone()
        batch = build_batch([Segment([0], 5, sl) for sl in slots], S)
        rows = [slots.index(sl) for sl in batch.slot_ids]  # slot 6 always gets row 0
        mixed, z, b, a = (t[rows] for t in parts)
        with torch.no_grad():
            out = kernels.gated_delta_net_decode(mixed, z, a, b, layer, c, s, batch)
        results.append((out[batch.slot_ids.index(6)], c[6], s[6]))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_gdn_decode_not_taken_for_prefill_or_grad():
    layer, conv, ssm = gdn_layer()
    mixed = torch.randn(3, layer.conv_weight.shape[0])
    prefill = build_batch([Segment([0, 1, 2], 0, 1)], S)
    assert kernels.gated_delta_net_decode(mixed, None, None, None, layer, conv, ssm, prefill) is None
    with torch.enable_grad():
        assert not cpu_native.applies(mixed)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3_5"])
def test_attention_decode_matches_torch_path(case, arch, threads, monkeypatch):
    slots, starts = CASES[case]
    cfg = ModelConfig.from_dict(tiny_config(arch, model_type=arch))
    torch.manual_seed(2)
    layer = GatedAttention(cfg).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    shape = (S, 32, cfg.num_kv_heads, cfg.head_dim)
    kv = (torch.randn(shape), torch.randn(shape))
    for cache in kv:  # unused slots: poison, never read or written
        cache[[s for s in range(S) if s not in slots]] = float("nan")
    ref_kv = (kv[0].clone(), kv[1].clone())
    batch = build_batch([Segment([0], p, s) for s, p in zip(slots, starts)], S)
    x = torch.randn(len(slots), cfg.hidden_size)
    with torch.no_grad():
        out = layer(x, batch, kv)
        monkeypatch.setattr(kernels, "gated_attention_decode", lambda *a: None)
        ref = layer(x, batch, ref_kv)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(kv, ref_kv):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_attention_decode_rejects_position_outside_cache():
    cfg = ModelConfig.from_dict(tiny_config("qwen3_next", model_type="qwen3_next"))
    layer = GatedAttention(cfg).eval()
    kv = tuple(torch.zeros(2, 8, cfg.num_kv_heads, cfg.head_dim) for _ in range(2))
    batch = build_batch([Segment([0], 8, 1)], 2)
    with torch.no_grad(), pytest.raises(RuntimeError, match="position 8 outside the KV cache"):
        layer(torch.randn(1, cfg.hidden_size), batch, kv)


@pytest.mark.parametrize("slots", [[5], [9, 2], [4, 7, 1]], ids=lambda s: f"seqs{len(s)}")
@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3_5"])
def test_decoder_layer_equals_per_op_route(slots, arch, threads, monkeypatch):
    """A layer in one or two native calls gives bit for bit what the per-op native route gives (both packed, so the
    same kernels run), which matches the plain torch layers to 1e-5 of the output's scale."""
    from deltaserve.layers.model import HybridModel
    cfg = ModelConfig.from_dict(tiny_config(arch, model_type=arch))
    torch.manual_seed(3)
    model = HybridModel(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    gdn_at, attn_at = cfg.layer_types.index("linear_attention"), cfg.layer_types.index("full_attention")
    caches = {gdn_at: (torch.randn(S, cfg.conv_kernel - 1, cfg.conv_dim),
                       torch.randn(S, cfg.num_v_heads, cfg.k_head_dim, cfg.v_head_dim)),
              attn_at: tuple(torch.randn(S, 32, cfg.num_kv_heads, cfg.head_dim) for _ in range(2))}
    for cache in caches.values():
        for t in cache:
            t[[s for s in range(S) if s not in slots]] = float("nan")  # unused slots: never read or written
    batch = build_batch([Segment([0], 3 * s % 7, s) for s in slots], S)  # slot 7 starts at 0: a reset
    x, residual = torch.randn(len(slots), cfg.hidden_size), torch.randn(len(slots), cfg.hidden_size)

    def run():  # the GDN layer as a later layer (a residual stream to add), the attention layer as the first
        states = {i: tuple(t.clone() for t in c) for i, c in caches.items()}
        with torch.no_grad():
            outs = [*model.layers[gdn_at](x, residual, batch, states[gdn_at]),
                    *model.layers[attn_at](x, None, batch, states[attn_at])]
        return outs, [t for c in states.values() for t in c]

    oracle = run()
    assert pack_for_cpu(model)
    taken = []
    monkeypatch.setattr(cpu_native, "decoder_layer", lambda *a, real=cpu_native.decoder_layer: taken.append(1) or real(*a))
    block = run()
    assert len(taken) == 2
    monkeypatch.setattr(kernels, "decoder_layer_decode", lambda *a: None)
    per_op = run()
    for b, p, o in zip(block[0] + block[1], per_op[0] + per_op[1], oracle[0] + oracle[1]):
        assert torch.equal(b.nan_to_num(), p.nan_to_num()) and b.isnan().sum() == p.isnan().sum()
        scale = o.nan_to_num().abs().max().item()  # FFN outputs alone: errors relative to the tensor's scale
        torch.testing.assert_close(b, o, rtol=1e-5, atol=1e-5 * max(scale, 1.0), equal_nan=True)
