"""Weights kept in their GGUF block formats on the CPU (issue 15): the packed layout and the native kernels against
gguf-py's dequantizers and the torch reference (kernels/quantized.py); a row's result alone and in any batch; the
ISA paths; a model stored in a Q4_K_M-like mix of formats, end to end.

Bound for the int8 activations: the kernels compute W x^ exactly (up to float rounding), x^ being x quantized per
32 (|x - x^| <= d / 2, d = max|x| / 127), so |W x^ - W x| <= |W| |x - x^|, elementwise.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from deltaserve import LLM, LLMEngine, SamplingParams
from deltaserve.config import ModelConfig
from deltaserve.kernels import cpu_native
from deltaserve.kernels.quantized import QuantizedWeight, QuantSegment, quantize_activations, quantized_linear
from deltaserve.layers.cpu_packed import pack_weights
from deltaserve.layers.feed_forward import SparseMoE
from deltaserve.layers.linear import set_weight
from deltaserve.weights.gguf_file import GGUFFile
from deltaserve.weights.loader import load_model, matrix_params
from deltaserve.weights.safetensors_dir import CheckpointError
from drive import prompt_logits
from gguf_edit import SCALE_AT, random_blocks, rewrite_gguf
from tiny_models import tiny_config

pytestmark = pytest.mark.skipif(cpu_native.ops() is None, reason="no C++ toolchain to build the CPU kernels")

FORMATS = [Q.Q8_0, Q.Q4_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS, Q.MXFP4]
def weight(qtype, shape, seed=0) -> QuantizedWeight:
    return QuantizedWeight(shape, [QuantSegment(qtype, torch.from_numpy(random_blocks(qtype, shape, seed)))])


def assert_exact_product(y: torch.Tensor, x: torch.Tensor, w: QuantizedWeight) -> None:
    """y = x w^T as defined (integer segments on x quantized per 32 in the stored column order), to float32
    rounding: within 1e-5 of sum |x^| |w| of each output, the exact product taken in float64."""
    xs = x.double() if w.col_perm is None else x.double()[:, torch.argsort(w.col_perm)]
    exact, scale = [], []
    for seg in w.segments:
        deq = QuantizedWeight((seg.rows, w.shape[-1]), [seg]).dequantize().double()
        xa = quantize_activations(xs).double() if seg.qtype not in (Q.F32, Q.F16, Q.BF16) else xs
        exact.append(xa @ deq.T)
        scale.append(xa.abs() @ deq.abs().T)
    assert ((y.double() - torch.cat(exact, -1)).abs() <= 1e-5 * torch.cat(scale, -1) + 1e-12).all()



@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
@pytest.mark.parametrize("shape", [(16, 256), (37, 512), (3, 1024)], ids=str)
def test_packed_blocks_hold_the_files_values(qtype, shape):
    w = weight(qtype, shape)
    packed = cpu_native.pack(w)
    ref = dequantize(w.segments[0].data.numpy(), qtype)  # gguf-py's dequantizer: the oracle
    assert torch.equal(packed.rows(0, torch.arange(shape[0])), torch.from_numpy(ref))
    growth = 1.04 if qtype == Q.Q3_K else 1.03  # 6-bit scales a byte each
    assert packed.nbytes <= growth * -(-shape[0] // 16) * 16 * w.nbytes / shape[0]  # the file's size, rows padded to 16


def test_mxfp4_scales_at_the_e8m0_edges():
    """E8M0 bytes 0 and 1 are subnormal floats (2^-128, 2^-127), 250 is 2^122: unpacked as gguf-py reads them."""
    w = weight(Q.MXFP4, (16, 256))
    w.segments[0].data.view(16, 8, 17)[:, :, 0] = torch.tensor([0, 1, 2, 3, 127, 128, 200, 250], dtype=torch.uint8)
    ref = dequantize(w.segments[0].data.numpy(), Q.MXFP4)
    assert torch.equal(cpu_native.pack(w).rows(0, torch.arange(16)), torch.from_numpy(ref))


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 17, 70])
def test_linear_is_the_exact_product_with_quantized_activations(qtype, rows, threads):
    w = weight(qtype, (37, 512), seed=rows)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows)) * 3
    out = cpu_native.linear(x, cpu_native.pack(w))
    for y in (out, quantized_linear(x, w)):  # the kernel, and the torch reference of the same definition
        assert_exact_product(y, x, w)
    deq, xq = w.dequantize().double(), quantize_activations(x).double()
    # the bound of the activation quantization, against the product with float activations
    assert ((out.double() - x.double() @ deq.T).abs() <= (x.double() - xq).abs() @ deq.abs().T * (1 + 1e-4) + 1e-6).all()


def test_kernels_quantize_activations_as_the_reference():
    """Through a Q8_0 identity matrix (d = 1, one code 1 per row) the kernel returns x as it quantized it: equal to
    quantize_activations value for value, including x / d = 63.5 - 1 ulp, where a reciprocal-multiply 127 / max
    (torch's scalar / tensor) rounds the other way than the kernels' division."""
    k = 512
    raw = np.zeros((k, k // 32, 34), np.uint8)
    raw[:, :, 0:2] = np.array([1.0], np.float16).view(np.uint8)
    raw[np.arange(k), np.arange(k) // 32, 2 + np.arange(k) % 32] = 1
    eye = cpu_native.pack(QuantizedWeight((k, k), [QuantSegment(Q.Q8_0, torch.from_numpy(raw.reshape(k, -1)))]))
    x = torch.randn(64, k, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 2, 64)[:, None]
    x[0, :2] = torch.tensor([8.225171089172363, -4.112585544586182])  # -4.1125855 * 127 / 8.225171 = -63.5 - 1 ulp
    assert torch.equal(cpu_native.linear(x, eye), quantize_activations(x))


def test_activation_quantization_error_is_half_a_step():
    x = torch.randn(5, 256) * torch.logspace(-3, 3, 256)
    d = x.view(5, 8, 32).abs().amax(-1, keepdim=True) / 127
    assert ((quantize_activations(x) - x).view(5, 8, 32).abs() <= d / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_row_results_do_not_depend_on_the_batch(qtype, threads):
    """A row alone and as row 0 .. n-1 of batches of 2, 3, 8, 17, 70 rows: bit-identical."""
    packed = cpu_native.pack(weight(qtype, (100, 256), seed=3))
    x = torch.randn(70, 256, generator=torch.Generator().manual_seed(0))
    alone = torch.cat([cpu_native.linear(x[i:i + 1], packed) for i in range(70)])
    for n in (2, 3, 8, 17, 70):
        assert torch.equal(cpu_native.linear(x[:n], packed), alone[:n])
        assert torch.equal(cpu_native.linear(x[70 - n:], packed), alone[70 - n:])


def test_mixed_formats_experts_and_column_order():
    """One weight from segments of several formats (a fused projection), a stack of 3 experts, and a column
    permutation (qwen35 GGUF files store out_proj's V heads tiled): values and products as the reference."""
    e, k = 3, 256
    parts = [(Q.Q6_K, 32), (Q.Q8_0, 5), (Q.Q4_K, 20)]
    segs = [QuantSegment(q, torch.from_numpy(random_blocks(q, (e, n, k), seed=i))) for i, (q, n) in enumerate(parts)]
    segs.insert(1, QuantSegment(Q.F32, torch.randn(e, 9, k).mul(0.05).view(torch.uint8)))
    w = QuantizedWeight((e, 66, k), segs, col_perm=torch.randperm(k, generator=torch.Generator().manual_seed(1)))
    packed = cpu_native.pack(w)
    for x in range(e):
        assert torch.equal(packed.rows(x, torch.arange(66)), w.dequantize()[x])
    x = torch.randn(4, k)
    assert_exact_product(cpu_native.linear(x, cpu_native.pack(w.expert(0))), x, w.expert(0))


@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_moe_block_on_quantized_experts(tokens, threads):
    cfg = ModelConfig.from_dict(tiny_config("qwen3_5_moe", model_type="qwen3_5_moe", hidden_size=256,
                                            moe_intermediate_size=256, shared_expert_intermediate_size=256))
    torch.manual_seed(tokens)
    moe = SparseMoE(cfg).eval()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    set_weight(moe, "experts_gate_up", weight(Q.Q4_K, tuple(moe.experts_gate_up.shape), seed=1))
    set_weight(moe, "experts_down", weight(Q.Q6_K, tuple(moe.experts_down.shape), seed=2))
    plain = copy.deepcopy(moe)  # the torch path on the QuantizedWeights: the reference
    pack_weights(moe)
    x = torch.randn(tokens, 256)
    with torch.no_grad():
        out, ref = moe(x), plain(x)
        singles = torch.cat([moe(x[t:t + 1]) for t in range(tokens)])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert torch.equal(singles, out)


def test_isa_paths_give_the_same_bits():
    """The AVX2 build (and plain C where AVX2 is what this CPU has) computes every format bit for bit as the
    build for this CPU: integer dot products are exact, and each lane's float operations are the same."""
    lower = "generic" if cpu_native.cpu_isa() == "avx2" else "avx2"
    if cpu_native.cpu_isa() == "generic" or cpu_native.ops(lower) is None:
        pytest.skip("no second ISA to compare")
    x = torch.randn(9, 512)
    for q in [*FORMATS, Q.F32, Q.BF16]:
        w = weight(q, (37, 512)) if q in FORMATS else torch.randn(37, 512).to(torch.bfloat16 if q == Q.BF16 else
                                                                            torch.float32)
        here = cpu_native.linear(x, cpu_native.pack(w))
        assert torch.equal(cpu_native.ops(lower).linear(x, cpu_native.pack(w, lower)), here), q.name


# ---- a model stored in a Q4_K_M-like mix (the mix_gguf fixture of conftest.py) ----

def test_mix_loads_as_stored(mix_gguf, caplog):
    with caplog.at_level(logging.WARNING):
        model, _ = load_model(mix_gguf)
    assert "Q5_1 tensors are dequantized to float32 at load" in caplog.text
    gdn = model.layers[0].mixer
    assert gdn.in_proj.weight.qtypes == ["Q6_K", "Q4_K", "Q8_0"]  # [q k v | z | b a] rows as stored
    assert gdn.out_proj.weight.col_perm is not None  # qwen35: V heads tiled in the file
    assert model.layers[3].mixer.qkv_proj.weight.qtypes == ["Q4_K", "Q4_0", "Q6_K"]
    assert [model.layers[i].ffn.experts_down.qtypes for i in (1, 2)] == [["Q3_K"], ["Q2_K"]]
    assert model.layers[0].ffn.shared.gate_up.weight.qtypes == ["IQ4_XS", "MXFP4"]  # [gate | up] rows as stored
    assert isinstance(model.layers[3].ffn.experts_down, torch.Tensor)  # Q5_1: dequantized
    file_bytes = sum(GGUFFile(mix_gguf).data_bytes(n) for n in GGUFFile(mix_gguf).tensors)
    assert model.weight_bytes() <= 1.1 * file_bytes + model.layers[3].ffn.experts_down.numel() * 4


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_infinite_block_scale_names_the_tensor(mix_gguf, tmp_path, qtype):
    """A tensor kept in its blocks is checked as a dequantized one is: an Inf / NaN block scale fails the load, naming
    it."""
    blocks = random_blocks(qtype, (4, 256, 256))  # blk.1's routed down-projections [E, N, K]
    if qtype == Q.MXFP4:
        blocks[1, 3, 0] = 255  # E8M0 NaN
    else:
        at = SCALE_AT[qtype][-1]
        blocks[1, 3, at:at + 2] = np.array([np.inf], np.float16).view(np.uint8)
    bad = rewrite_gguf(mix_gguf, tmp_path / "bad.gguf", retype={"blk.1.ffn_down_exps.weight": (blocks, qtype)})
    with pytest.raises(CheckpointError, match=rf"'blk.1.ffn_down_exps.weight' \({qtype.name}\) holds NaN or Inf"):
        load_model(bad)


def mix_llm(path, max_num_seqs=8):
    return LLM(path, dtype="float32", max_num_seqs=max_num_seqs, max_model_len=128, max_num_batched_tokens=24)


PROMPTS = [list(range(3, 43)), [7, 9, 11], list(range(100, 160, 3))]


def score(engine: LLMEngine) -> list[torch.Tensor]:
    return prompt_logits(engine, PROMPTS)


def test_mix_logits_within_the_activation_rounding_bound(mix_gguf):
    """Against the float32 model of the same dequantized weights (float activations). Each quantized product
    rounds its input per 32 to steps d = max / 127: a relative RMS error of max/rms / (127 sqrt 12), at most
    1.0% for blocks whose max is within 4x their RMS. n such errors along the network add in quadrature; with
    the gain of 2 of test_gguf_quant.py: rel_rms(logits) <= 2 sqrt(n) * 0.010, n = 4 products a layer + head."""
    quantized = mix_llm(mix_gguf).score(PROMPTS)
    model, cfg = load_model(mix_gguf)
    for name in matrix_params(model):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(getattr(module, attr), QuantizedWeight):
            set_weight(module, attr, getattr(module, attr).dequantize())
    reference = score(LLMEngine(model, cfg, None, max_num_seqs=8, max_model_len=128, max_num_batched_tokens=24))
    n = 4 * cfg.num_layers + 1
    for q, f in zip(quantized, reference):
        rel_rms = float((q - f).pow(2).mean().sqrt() / f.pow(2).mean().sqrt())
        assert 0 < rel_rms <= 2 * n ** 0.5 * 0.010, rel_rms


@pytest.mark.parametrize("np_", [2, 3, 8])
def test_mix_sequences_match_their_solo_runs(mix_gguf, np_):
    llm = mix_llm(mix_gguf, max_num_seqs=np_)
    g = torch.Generator().manual_seed(np_)
    prompts = [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (2 * np_,), generator=g)]
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=1)
    together = llm.generate(prompts, params)
    for prompt, out in zip(prompts, together):
        alone = llm.generate([prompt], params)[0]
        assert alone.token_ids == out.token_ids
        assert alone.logprobs == out.logprobs  # bit for bit: the same kernels on the same chunks
