"""Quantized weights on CUDA (issue 16): the Triton GEMV / GEMM / MoE kernels on each planar format against the
torch reference of the same weights (kernels/gpu_quant.py, itself checked against gguf-py on the CPU), and whole
models: a block-FP8 checkpoint loaded as such, models quantized to each GGUF format, logits against the float
model of the same dequantized weights and each sequence equal to its solo run up to np = 64."""

import copy
import random

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from deltaserve import LLMEngine, SamplingParams  # noqa: E402
from deltaserve.kernels.gpu_quant import PlanarWeight  # noqa: E402
from deltaserve.kernels.triton import qgemv_i8 as qi  # noqa: E402
from deltaserve.kernels.triton import qlinear as ql  # noqa: E402
from deltaserve.kernels.triton.moe import sparse_moe  # noqa: E402
from deltaserve.kernels.triton.qgemm_i8 import qgemm_i8  # noqa: E402
from deltaserve.kernels.triton.qlinear import qlinear  # noqa: E402
from deltaserve.layers.linear import set_weight  # noqa: E402
from deltaserve.weights.fp8 import write_fp8_checkpoint  # noqa: E402
from deltaserve.weights.loader import load_model, matrix_params  # noqa: E402
from deltaserve.weights.quantize import quantize_model, quantize_planar  # noqa: E402
from drive import drive  # noqa: E402
from tiny_models import save_hf_model  # noqa: E402

FMTS = ["fp8", "q8_0", "q4_k", "q5_k", "q6_k"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("t", [1, 17])
@pytest.mark.parametrize("n,k", [(40, 512), (2048, 2048), (130, 256)], ids=str)
@pytest.mark.parametrize("fmt", FMTS)
def test_qlinear_matches_reference(fmt, n, k, t, dtype, check):
    g = torch.Generator().manual_seed(n + k + t)
    w = quantize_planar(torch.randn(n, k, generator=g).cuda(), fmt, dtype)
    x = torch.randn(t, k, generator=g).cuda().to(dtype)
    ref = x.double() @ w.dequantize().double().T
    check(f"qlinear {fmt} {n}x{k} t{t} {dtype}", qlinear(x, w), ref, TOL[dtype])


@pytest.mark.parametrize("asm", [True, False], ids=["dp4a", "byte-products"])
@pytest.mark.parametrize("n,k", [(40, 512), (2048, 2048), (130, 4096)], ids=str)
@pytest.mark.parametrize("fmt", qi.I8_FORMATS)
def test_int8_gemv_matches_rounded_x(fmt, n, k, asm, check, monkeypatch):
    """Few bf16 rows on the integer GEMV: float64 products of x as rounded to int8 per 32 (torch reference) and
    the dequantized weights, exact up to float rounding (the integer sums are exact); a row's result the same
    alone and among 3 or 8; qlinear takes this route."""
    monkeypatch.setattr(qi, "ASM", asm)
    monkeypatch.setattr(ql, "I8_GEMV", True)
    g = torch.Generator().manual_seed(n + k)
    w = quantize_planar(torch.randn(n, k, generator=g).cuda(), fmt, torch.bfloat16)
    x = (torch.randn(8, k, generator=g) * torch.rand(8, k, generator=g) * 4).cuda().bfloat16()
    x[0, :32] = 0  # a group of zeros: scale 0
    ref = qi.rounded_x(x).double() @ w.dequantize().double().T
    out = torch.empty(8, n, device="cuda")
    qi.qgemv_i8(qi.quantize_x(x, fmt != "q8_0"), w.segments[0], out)
    check(f"int8 gemv {fmt} {n}x{k} {'dp4a' if asm else 'bytes'}", out, ref, 1e-6)
    for rows in (1, 3):
        alone = torch.empty(rows, n, device="cuda")
        qi.qgemv_i8(qi.quantize_x(x[:rows], fmt != "q8_0"), w.segments[0], alone)
        assert torch.equal(alone, out[:rows])
    assert torch.equal(qlinear(x, w), out.bfloat16())


@pytest.mark.parametrize("t", [9, 40, 200])
@pytest.mark.parametrize("fmt", qi.I8_FORMATS)
def test_int8_gemm_matches_rounded_x_and_the_gemv(fmt, t, check, monkeypatch):
    """More than 8 bf16 rows on int8 x (qlinear.qgemm_i8, exact integer products per 32 on tensor cores): within float
    rounding of float64 products of the int8-rounded x and the dequantized weights, and of the GEMV's result for the
    same rows (so a row's result does not move when its step crosses 8 rows); a row the same in any batch."""
    monkeypatch.setattr(ql, "I8_GEMV", True)
    g = torch.Generator().manual_seed(t)
    w = quantize_planar(torch.randn(384, 2048, generator=g).cuda(), fmt, torch.bfloat16)
    x = (torch.randn(t, 2048, generator=g) * torch.rand(t, 2048, generator=g) * 4).cuda().bfloat16()
    x[0, :32] = 0
    out = torch.empty(t, 384, device="cuda")
    qgemm_i8(qi.quantize_x(x, False), w.segments[0], out)
    check(f"int8 gemm {fmt} t{t}", out, qi.rounded_x(x).double() @ w.dequantize().double().T, 1e-6)
    gemv = torch.empty(8, 384, device="cuda")
    qi.qgemv_i8(qi.quantize_x(x[:8], fmt != "q8_0"), w.segments[0], gemv)
    check(f"int8 gemm vs gemv {fmt} t{t}", out[:8], gemv, 1e-6)
    tail = torch.empty(9, 384, device="cuda")
    qgemm_i8(qi.quantize_x(x[-9:].contiguous(), False), w.segments[0], tail)
    assert torch.equal(tail, out[-9:])
    assert torch.equal(ql.qlinear(x, w), out.bfloat16())


def bf16_moe_case(fmt: str, tokens: int, seed: int):
    """(x [tokens, 1024], sparse_moe's other arguments) of a random MoE block on quantized bf16 stacks."""
    e, i, d, s, top = 16, 512, 1024, 512, 4
    g = torch.Generator().manual_seed(seed)
    q = {n: quantize_planar(torch.randn(*shape, generator=g).cuda() / shape[-1] ** 0.5, fmt, torch.bfloat16)
         for n, shape in [("gu", (e, 2 * i, d)), ("dn", (e, d, i)), ("sgu", (2 * s, d)), ("sdn", (d, s))]}
    router, sg = torch.randn(e, d, generator=g).cuda().bfloat16(), torch.randn(1, d, generator=g).cuda().bfloat16()
    x = torch.randn(tokens, d, generator=g).cuda().bfloat16()
    return x, (router, q["gu"], q["dn"], q["sgu"], q["sdn"], sg, top, True)


@pytest.mark.parametrize("fmt", qi.I8_FORMATS)
def test_moe_pairs_on_int8_x(fmt, check, monkeypatch):
    """The few-token MoE block on quantized stacks with int8 x: each token the same alone and among 5, and within
    the error of two activation roundings (tokens, then the SwiGLU rows) of the float path."""
    x, rest = bf16_moe_case(fmt, 5, 3)
    want = torch.cat([sparse_moe(x[j:j + 1], *rest) for j in range(5)])
    monkeypatch.setattr(ql, "I8_GEMV", True)
    got = sparse_moe(x, *rest)
    assert torch.equal(got, torch.cat([sparse_moe(x[j:j + 1], *rest) for j in range(5)]))
    check(f"moe pairs int8 x {fmt}", got, want, 3e-2)


@pytest.mark.parametrize("fmt", qi.I8_FORMATS)
def test_moe_grouped_on_int8_x_matches_the_tokens_alone(fmt, check, monkeypatch):
    """12 tokens (the grouped matmuls, moe.py) on int8 x: each token within float rounding of its own few-token run
    (the pairs on int8 x), not the ~1e-2 of x's rounding, so a token's result does not move when its step crosses 8
    tokens (Triton's interpreter, fp16: equal for q8_0 / q4_k, 6.7e-6 for q6_k)."""
    x, rest = bf16_moe_case(fmt, 12, 4)
    monkeypatch.setattr(ql, "I8_GEMV", True)
    check(f"moe grouped int8 x vs tokens alone {fmt}", sparse_moe(x, *rest),
          torch.cat([sparse_moe(x[j:j + 1], *rest) for j in range(12)]), 1e-3)


@pytest.mark.parametrize("int8_x", [False, True], ids=["float-x", "int8-x"])
@pytest.mark.parametrize("fmt", FMTS)
def test_prologue_gemv_equals_the_norm_then_the_product(fmt, int8_x, monkeypatch):
    """One row through the gated RMS norm (or the sigmoid gate) inside the quantized GEMV (or inside x's int8
    quantization) equals the separate norm kernel then qlinear, bit for bit."""
    if int8_x and fmt not in qi.I8_FORMATS:
        pytest.skip("fp8 has no int8-x path")
    from deltaserve.kernels.triton.rowwise import gate_mul, gated_rms_norm
    monkeypatch.setattr(ql, "I8_GEMV", int8_x)
    g = torch.Generator().manual_seed(5)
    h, dv, n = 16, 128, 2048
    w = quantize_planar(torch.randn(n, h * dv, generator=g).cuda() / 64, fmt, torch.bfloat16)
    x, z = (torch.randn(1, h * dv, generator=g).cuda().bfloat16() for _ in range(2))
    nw = torch.rand(dv, generator=g).cuda() + 0.5
    normed = gated_rms_norm(x.view(1, h, dv), z.view(1, h, dv), nw, 1e-6).reshape(1, -1)
    assert torch.equal(ql.norm_qlinear(x, z, nw, 1e-6, w), qlinear(normed, w))
    gate = torch.randn(1, h, 2 * dv, generator=g).cuda().bfloat16()[:, :, :dv]  # a strided view, as the layer's
    gated = gate_mul(x.view(1, h, dv), gate, sigmoid=True).reshape(1, -1)
    assert torch.equal(ql.norm_qlinear(x, gate, gate, 0., w, gated=False), qlinear(gated, w))


@pytest.mark.parametrize("int8_x", [False, True], ids=["float-x", "int8-x"])
@pytest.mark.parametrize("i,k", [(96, 512), (2560, 1024), (64, 4608)], ids=str)
@pytest.mark.parametrize("fmt", FMTS)
def test_swiglu_qgemv_equals_the_separate_kernels(fmt, i, k, int8_x, monkeypatch):
    """A dense MLP's input half for one row in one quantized GEMV launch (SiLU(gate) * up in the epilogue; with the
    residual add + RMS norm in the prologue) equals qlinear and silu_mul bit for bit, and add_rms_norm before them
    up to the norm's sum of squares, which the prologue adds up per column block (Triton's interpreter: bit for bit
    for every format, float32 and fp16, these shapes; int8 x: the quantization with the add + norm, then the integer
    GEMV with the SwiGLU, against add_rms_norm, qlinear on int8 x and silu_mul)."""
    from deltaserve.kernels.triton.rowwise import add_rms_norm, gate_mul
    if int8_x and fmt not in qi.I8_FORMATS:
        pytest.skip("fp8 has no int8-x path")
    monkeypatch.setattr(ql, "I8_GEMV", int8_x)
    g = torch.Generator().manual_seed(i + k)
    w = quantize_planar(torch.randn(2 * i, k, generator=g).cuda() / k ** 0.5, fmt, torch.bfloat16)
    x, y = (torch.randn(1, k, generator=g).cuda().bfloat16() for _ in range(2))
    nw = (torch.randn(k, generator=g) * 0.1).cuda().bfloat16()
    h = qlinear(x, w)
    assert torch.equal(ql.swiglu_qgemv(x, w)[1], gate_mul(h[:, i:], h[:, :i], sigmoid=False))
    total, out = ql.swiglu_qgemv(x, w, y, nw, 1e-6)
    s, normed = add_rms_norm(x, y, nw, 1e-6)
    h = qlinear(normed, w)
    ref = gate_mul(h[:, i:], h[:, :i], sigmoid=False).float()
    assert torch.equal(total, s) and float((out.float() - ref).norm() / ref.norm()) <= 1e-3


def test_qlinear_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(0)
    w = quantize_planar(torch.randn(512, 1024, generator=g).cuda(), "q4_k")
    x = torch.randn(16, 1024, generator=g).cuda().bfloat16()
    assert torch.equal(qlinear(x[:3], w), qlinear(x, w)[:3])  # GEMM rows: the same K loop at any T <= 16


def test_mixed_segments_and_permuted_columns(check):
    g = torch.Generator().manual_seed(1)
    a, b = quantize_planar(torch.randn(24, 512, generator=g).cuda(), "q6_k"), torch.randn(8, 512, generator=g)
    w = PlanarWeight((32, 512), a.segments + [quantize_planar(b.cuda(), "q8_0").segments[0]],
                     col_perm=torch.randperm(512, generator=g).cuda())
    for t in (1, 5):
        x = torch.randn(t, 512, generator=g).cuda()
        check(f"qlinear mixed t{t}", qlinear(x, w), x.double() @ w.dequantize().double().T, 1e-5)


@pytest.mark.parametrize("s", [256, 512], ids=["shared-as-a-pair", "shared-wider"])
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("t", [1, 5, 40])
def test_sparse_moe_quantized_matches_reference(fmt, t, s, check):
    """The shared expert as wide as the routed ones (Qwen's checkpoints: it runs as one more pair per token) or
    wider (Qwen3-Next's tiny fixture, 48 vs 32: its own products)."""
    e, i, d, top = 16, 256, 512, 4
    g = torch.Generator().manual_seed(t)
    q = {n: quantize_planar(torch.randn(*shape, generator=g).cuda() / shape[-1] ** 0.5, fmt, torch.float32)
         for n, shape in [("gu", (e, 2 * i, d)), ("dn", (e, d, i)), ("sgu", (2 * s, d)), ("sdn", (d, s))]}
    router, sg = torch.randn(e, d, generator=g).cuda(), torch.randn(1, d, generator=g).cuda()
    x = torch.randn(t, d, generator=g).cuda()
    gu, dn, sgu, sdn = (q[n].dequantize().double() for n in ("gu", "dn", "sgu", "sdn"))
    xd = x.double()
    w, ex = torch.softmax(xd @ router.double().T, -1).topk(top, -1)
    w = w / w.sum(-1, keepdim=True)
    h = torch.einsum("td,tkid->tki", xd, gu[ex])
    y = torch.einsum("tki,tkdi->tkd", F.silu(h[..., :i]) * h[..., i:], dn[ex])
    hs = xd @ sgu.T
    ref = (w[..., None] * y).sum(1) + torch.sigmoid(xd @ sg.double().T) * ((F.silu(hs[:, :s]) * hs[:, s:]) @ sdn.T)
    check(f"moe {fmt} t{t}", sparse_moe(x, router, q["gu"], q["dn"], q["sgu"], q["sdn"], sg, top, True), ref, 1e-5)


def dequantized(model):
    ref = copy.deepcopy(model)
    for name in matrix_params(ref):
        module_name, _, attr = name.rpartition(".")
        module = ref.get_submodule(module_name)
        if isinstance(getattr(module, attr), PlanarWeight):
            set_weight(module, attr, getattr(module, attr).dequantize())
    return ref


DIMS = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_num_key_heads=2,
            linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64, num_experts=8,
            num_experts_per_tok=2, moe_intermediate_size=256, shared_expert_intermediate_size=256)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: (quantized model, float model of its dequantized weights, cfg)} on CUDA, float32 activations."""
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    fp8 = write_fp8_checkpoint(save_hf_model("qwen3_next", root / "next"), root / "next-fp8")
    model, cfg = load_model(fp8, torch.float32, "cuda")
    out["fp8-file"] = model, dequantized(model), cfg
    base = save_hf_model("qwen3_5_moe", root / "moe", **DIMS)
    for fmt in ("q8_0", "q4_k", "q6_k"):
        model, cfg = load_model(base, torch.float32, "cuda")
        assert quantize_model(model, lambda name: fmt) > 0
        out[fmt] = model, dequantized(model), cfg
    # a dense model: its MLPs' decode rows take the quantized SwiGLU GEMV (the add + norm in its prologue)
    dims = {k: v for k, v in DIMS.items() if "expert" not in k and "moe" not in k} | dict(intermediate_size=512)
    model, cfg = load_model(save_hf_model("qwen3_5", root / "dense", **dims), torch.float32, "cuda")
    assert quantize_model(model, lambda name: "q5_k") > 0
    out["q5_k-dense"] = model, dequantized(model), cfg
    return out


@pytest.mark.parametrize("name", ["fp8-file", "q8_0", "q4_k", "q6_k", "q5_k-dense"])
def test_quantized_model_logits_and_solo_equality(models, name, check):
    model, ref, cfg = models[name]
    prompt = list(range(5, 60))
    logits = []
    for m in (model, ref):
        eng = LLMEngine(m, cfg, None, max_num_seqs=64, max_model_len=256, max_num_batched_tokens=128, device="cuda")
        eng.add_request("p", prompt, SamplingParams(max_tokens=0), prompt_logits_from=0)
        while eng.has_unfinished_requests():
            for o in eng.step():
                logits.append(o.prompt_logits)
    check(f"model {name} prompt logits", logits[0], logits[1], 1e-4)
    decoded = []  # the decode paths (one row; a few rows: MoE pairs) against the float model too
    for m in (model, ref):
        eng = LLMEngine(m, cfg, None, max_num_seqs=4, max_model_len=256, device="cuda")
        decoded.append(drive(eng, [(f"d{j}", prompt[j:j + 9], SamplingParams(max_tokens=8, temperature=0), 0, None)
                                   for j in range(3)]))
    for rid in decoded[0]:
        assert decoded[0][rid][0] == decoded[1][rid][0], rid
        check(f"model {name} decode logits {rid}", decoded[0][rid][1], decoded[1][rid][1], 1e-4)
    rng = random.Random(7)
    for np_ in (1, 8, 64):
        eng = LLMEngine(model, cfg, None, max_num_seqs=np_, max_model_len=256, max_num_batched_tokens=128,
                        device="cuda")
        requests = [(f"r{i}", [rng.randrange(cfg.vocab_size) for _ in range(rng.randint(1, 40))],
                     SamplingParams(max_tokens=6, temperature=0), rng.randint(0, 4), None) for i in range(np_ + 2)]
        together = drive(eng, requests)
        # each solo run costs a few steps (and captures): 10 of the sequences that ran among the others suffice
        for rid, prompt, params, _, _ in rng.sample(requests, min(10, len(requests))):
            assert together[rid][0] == drive(eng, [(rid + "s", prompt, params, 0, None)])[rid + "s"][0], rid
