"""CPU speed paths (issue 9) against the torch reference on random inputs.

The engine packs its CPU model (layers/cpu_packed.py); these check the packed matmuls and the packed
model against the plain torch code they replace, and that a row's result never depends on its batch.
"""

import pytest
import torch
import torch.nn.functional as F

from deltaserve.cache.state_cache import HybridCache
from deltaserve.engine.batch import Segment
from deltaserve.engine.model_runner import ModelRunner
from deltaserve.kernels import cpu_linear
from deltaserve.layers.cpu_packed import PackedHybridModel, PackedLinear, PackedSparseMoE, pack_for_cpu, unpack
from deltaserve.weights.loader import load_model
from tiny_models import save_hf_model

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("rows", [1, 3, 8, 64, 129])
@pytest.mark.parametrize("shape", [(48, 64), (6176 // 16, 1024), (1, 64), (2048, 256)], ids=str)
def test_linear_matches_f_linear(rows, shape):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(shape, generator=g) / shape[1] ** 0.5
    x = torch.randn(rows, shape[1], generator=g)
    torch.testing.assert_close(cpu_linear.linear(x, cpu_linear.pack(w)), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_linear_takes_any_leading_shape_and_strides():
    w = torch.randn(40, 32)
    x = torch.randn(6, 3, 64)[..., ::2]  # [6, 3, 32], not contiguous
    torch.testing.assert_close(cpu_linear.linear(x, cpu_linear.pack(w)), F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_linear_row_independent_of_batch(threads):
    """Row 0 alone and within batches of 2..128 rows: identical (the engine's batch invariant)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = torch.randn(1000, 512) / 512 ** 0.5
        packed, x = cpu_linear.pack(w), torch.randn(128, 512)
        alone = cpu_linear.linear(x[:1], packed)
        for rows in (2, 4, 8, 16, 128):
            torch.testing.assert_close(cpu_linear.linear(x[:rows], packed)[:1], alone, rtol=1e-6, atol=1e-6)
    finally:
        torch.set_num_threads(old)


def test_few_row_route_agrees_with_batched_rows():
    """One or two rows take the native kernel, more oneDNN: a row agrees across both to 1e-6."""
    layer = torch.nn.Linear(512, 700, bias=False)
    x = torch.randn(8, 512)
    with torch.no_grad():
        ref = layer(x)
        assert pack_for_cpu_linear(layer)
        alone, pairs, batched = torch.cat([layer(x[i:i + 1]) for i in range(8)]), layer(x[:2]), layer(x)
    torch.testing.assert_close(alone, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, batched, rtol=1e-6, atol=1e-5)
    assert torch.equal(alone[:2], pairs)
    assert layer(x[:0]).shape == (0, 700)


def pack_for_cpu_linear(layer: torch.nn.Linear) -> bool:
    """pack_for_cpu on a lone linear, through a holder the packer walks."""
    holder = torch.nn.Module()
    holder.embed, holder.lm = torch.nn.Embedding(2, 2), layer
    return pack_for_cpu(holder) and type(layer) is PackedLinear


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return save_hf_model("qwen3_5", tmp_path_factory.mktemp("tied"), tie_word_embeddings=True)


@pytest.fixture(params=["qwen3_next", "qwen3_5", "qwen3_5_moe", "tied"])
def model_pair(request, tiny_dirs, tied_dir):
    path = tied_dir if request.param == "tied" else tiny_dirs[request.param]
    plain, cfg = load_model(path, torch.float32, "cpu")
    packed, _ = load_model(path, torch.float32, "cpu")
    assert pack_for_cpu(packed)
    return plain, packed, cfg


def test_pack_swaps_every_matmul(model_pair):
    _, packed, cfg = model_pair
    assert type(packed) is PackedHybridModel
    assert not [n for n, m in packed.named_modules() if type(m) is torch.nn.Linear]
    assert any(type(m) is PackedLinear for m in packed.modules())
    assert any(type(m) is PackedSparseMoE for m in packed.modules()) == (cfg.num_experts > 0)


def test_packed_model_matches_reference(model_pair):
    """Prefill chunks and mixed decode batches through the runner: packed vs plain torch model."""
    plain, packed, cfg = model_pair
    cpu = torch.device("cpu")
    runners = [ModelRunner(m, HybridCache(cfg, 4, 128, torch.float32, cpu), cpu) for m in (plain, packed)]
    unpack(plain)  # the runner packs CPU models: keep the reference plain
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (37, 5, 70)]
    steps = [[Segment(p, 0, slot, len(p)) for slot, p in enumerate(prompts)]]
    steps += [[Segment([i + slot], len(p) + i, slot) for slot, p in enumerate(prompts)] for i in range(4)]
    for segments in steps:
        ref, out = (r.run(segments) for r in runners)
        for a, b in zip(ref, out):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_unpack_restores_plain_model(model_pair):
    plain, packed, _ = model_pair
    unpack(packed)
    assert [type(m) for m in packed.modules()] == [type(m) for m in plain.modules()]
    assert all(p.is_contiguous() for p in packed.parameters())
    assert not hasattr(packed, "packed_lm_head")
