"""The one dispatch point for the model's kernels.

Layers call these names only. CPU tensors run the native kernels (`cpu_native.py`) where they apply, else the
torch reference (`reference.py`, `quantized.py`); CUDA tensors run the Triton kernels of `triton/` (imported on
first use, so CPU installs need no Triton), each checked against the reference in tests/cuda. A weight matrix
is a float tensor, a QuantizedWeight (its GGUF blocks), a PlanarWeight (quantized for the CUDA kernels) or a packed
CPU weight; `linear`, `embedding` and `sparse_moe` take all, the fused one-row CUDA paths float tensors and
PlanarWeights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_native, reference
from .gpu_quant import PlanarWeight
from .quantized import QuantizedWeight, quantized_linear
from .reference import causal_conv, gated_delta_rule

__all__ = ["add_norm_swiglu", "add_rms_norm", "attention", "causal_conv", "decoder_layer_decode", "embedding",
           "gated_attention_decode", "gated_attention_verify", "gated_delta_net", "gated_delta_net_decode",
           "gated_delta_net_verify", "gated_delta_rule", "gated_norm_linear", "gated_rms_norm", "linear", "norm_rotary",
           "rms_norm", "mix_by_parts", "sigmoid_gate", "sigmoid_gate_linear", "silu_mul", "sparse_moe", "swiglu_gemv"]


def linear(x: torch.Tensor, weight, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight^T -> [..., N]. Packed CPU weights: the native kernels (float32 x); QuantizedWeight: its
    torch reference (float32 out); PlanarWeight: the Triton kernels on CUDA, its torch reference elsewhere; CUDA
    without autograd: the Triton GEMV for one bf16/fp16 row, else cuBLAS; otherwise F.linear, a weight stored in
    another float dtype (bf16 kept as stored) cast to x's. out: a [T, N] destination (CUDA, 2-D x only)."""
    if x.is_cuda and not torch.is_grad_enabled():
        rows = x.reshape(-1, x.shape[-1])
        if isinstance(weight, PlanarWeight):
            from .triton.qlinear import qlinear
            y = qlinear(rows, weight, out)
        else:
            from .triton.linear import linear as cuda_linear
            y = cuda_linear(rows, weight, out)
        return y.view(*x.shape[:-1], y.shape[-1])
    assert out is None, "linear(out=...) is for CUDA"
    if cpu_native.is_packed(weight):
        return cpu_native.linear(x, weight)
    if isinstance(weight, QuantizedWeight):
        return quantized_linear(x, weight).to(x.dtype)
    if isinstance(weight, PlanarWeight):
        return F.linear(x.float(), weight.dequantize()).to(x.dtype)  # the torch reference (CPU tests)
    return F.linear(x, weight.to(x.dtype))


def embedding(ids: torch.Tensor, weight) -> torch.Tensor:
    """Rows `ids` of an embedding weight [V, D], dequantized to float32 where it is not a float tensor."""
    if cpu_native.is_packed(weight):
        return cpu_native.embedding(ids, weight)
    if isinstance(weight, QuantizedWeight):
        return weight.dequantize(ids.reshape(-1)).view(*ids.shape, weight.shape[-1])
    if isinstance(weight, PlanarWeight):
        return weight.dequantize(ids.reshape(-1)).to(weight.dtype).view(*ids.shape, weight.shape[-1])
    return F.embedding(ids, weight)


def gated_delta_net(mixed: torch.Tensor, a: torch.Tensor, b: torch.Tensor, conv_weight: torch.Tensor,
                    A_log: torch.Tensor, dt_bias: torch.Tensor, conv_pool: torch.Tensor, ssm_pool: torch.Tensor,
                    batch, num_k_heads: int, k_head_dim: int) -> torch.Tensor:
    """Conv window, gating and gated delta rule of a GDN layer, states by slot.

    mixed [T, C] pre-conv q|k|v; a, b [T, H] raw gate inputs; conv_weight [C, K]; A_log, dt_bias [H];
    conv_pool [S, K-1, C]; ssm_pool [S, H, Dk, Dv] float32. Returns [T, H, Dv] (float32 on CPU,
    mixed's dtype on CUDA, where gating and the q/k norm are fused into the delta-rule kernels).
    """
    if mixed.is_cuda:
        from .triton.gdn import gated_delta_net as cuda_gdn
        return cuda_gdn(mixed, a, b, conv_weight, A_log, dt_bias, conv_pool, ssm_pool, batch, num_k_heads, k_head_dim)
    t, h = mixed.shape[0], a.shape[1]
    mixed = causal_conv(mixed, conv_weight, conv_pool, batch)  # [T, C]
    kd = num_k_heads * k_head_dim
    q, k, v = mixed.split([kd, kd, mixed.shape[1] - 2 * kd], dim=-1)
    beta = b.float().sigmoid()  # [T, H]
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())  # [T, H] log decay
    q, k, v = q.view(t, num_k_heads, k_head_dim), k.view(t, num_k_heads, k_head_dim), v.view(t, h, -1)
    return gated_delta_rule(q, k, v, g, beta, ssm_pool, batch)


def gated_delta_net_decode(mixed: torch.Tensor, z: torch.Tensor, a: torch.Tensor, b: torch.Tensor, layer,
                           conv_pool: torch.Tensor, ssm_pool: torch.Tensor, batch) -> torch.Tensor | None:
    """Float32 CPU steps of one token per sequence: conv, gating, delta rule and the layer's gated norm in one
    native call -> [B, H*Dv]. None where that does not apply (then: gated_delta_net and the layer's norm)."""
    if mixed.is_cuda or not batch.one_token_each or not cpu_native.applies(mixed, conv_pool, ssm_pool):
        return None
    return cpu_native.gdn_decode(mixed, z, a, b, layer, conv_pool, ssm_pool, batch)


def gated_delta_net_verify(mixed: torch.Tensor, z: torch.Tensor, a: torch.Tensor, b: torch.Tensor, layer,
                           conv_pool: torch.Tensor, ssm_pool: torch.Tensor, batch) -> torch.Tensor | None:
    """A speculative verify segment alone in its batch (as batch.parts() runs each) on float32 CPU: its tokens one
    by one through the decode kernel, the state after each copied to its snapshot slot, so that verified tokens
    compute bit for bit what decoding them one at a time computes -> [L, H*Dv]. None elsewhere."""
    if mixed.is_cuda or len(batch.segments) != 1 or not batch.snapshots or not cpu_native.applies(mixed, conv_pool):
        return None
    return cpu_native.gdn_verify(mixed, z, a, b, layer, conv_pool, ssm_pool, batch.segments[0])


def gated_attention_verify(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer,
                           kv: tuple[torch.Tensor, torch.Tensor], batch) -> torch.Tensor | None:
    """The attention counterpart of gated_delta_net_verify: a verify segment's tokens one by one through the
    decode kernel -> [L, H*D]. None elsewhere."""
    if qg.is_cuda or len(batch.segments) != 1 or not batch.snapshots or not cpu_native.applies(qg, kv[0]):
        return None
    return cpu_native.attention_verify(qg, k, v, layer, kv, batch)


def gated_attention_decode(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer,
                           kv: tuple[torch.Tensor, torch.Tensor], batch) -> torch.Tensor | None:
    """Float32 CPU steps of one token per sequence: q/k norm, rotary, KV write, attention and the sigmoid
    gate in one native call -> [B, H*D]. None where that does not apply (then: the layer's own path)."""
    if qg.is_cuda or not batch.one_token_each or not cpu_native.applies(qg, kv[0], kv[1]):
        return None
    return cpu_native.attention_decode(qg, k, v, layer, kv, batch)


def mix_by_parts(x: torch.Tensor, proj: torch.Tensor, batch, cache, mix, out_proj) -> torch.Tensor:
    """A token mixer's core, mix(rows, batch, cache, project=False), on each part of the batch alone (batch.parts())
    for CPU inference, whose int8 activation rounding would magnify the float rounding a padded group of sequences
    adds; the parts' outputs then go through out_proj together. Elsewhere (CUDA; autograd, whose in-place cache
    writes between parts would break the graph) one call: mix(proj, batch, cache, project=True)."""
    parts = None if x.is_cuda or torch.is_grad_enabled() else batch.parts()
    if parts is None:
        return mix(proj, batch, cache, project=True)
    rows = proj.split([sum(part.lens) for part in parts])
    return out_proj(torch.cat([mix(r, part, cache) for r, part in zip(rows, parts)]))


def decoder_layer_decode(x: torch.Tensor, residual: torch.Tensor | None, layer, layer_cache,
                         batch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A whole DecoderLayer (its forward's arguments and results) in one or two native calls, for float32 CPU
    steps of one token per sequence on packed weights. None elsewhere (then: the layer's modules, through the two
    functions above on CPU)."""
    proj = layer.mixer.in_proj if layer.kind == "linear_attention" else layer.mixer.qkv_proj
    if (x.is_cuda or not batch.one_token_each or not cpu_native.is_packed(proj.weight)
            or not cpu_native.applies(x, *layer_cache)):
        return None
    return cpu_native.decoder_layer(x, residual, layer, layer_cache, batch)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              batch, scale: float) -> torch.Tensor:
    """Causal attention of each segment over its slot's KV blocks after appending its keys. See reference.attention."""
    if q.is_cuda:
        from .triton.attention import attention as cuda_attention
        return cuda_attention(q, k, v, k_cache, v_cache, batch.blocks_for(k_cache), batch.token_slots,
                              batch.positions, batch.cu_seqlens, batch.slots, batch, scale)
    return reference.attention(q, k, v, k_cache, v_cache, batch, scale, batch.blocks_for(k_cache))


# Glue of the layers: one launch each on CUDA; on CPU the same torch code the layers would run.

def add_rms_norm(x: torch.Tensor, y: torch.Tensor, norm) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the RMSNorm after it: (x + y, norm(x + y)). x, y [T, D]; norm an RMSNorm."""
    if x.is_cuda:
        from .triton.rowwise import add_rms_norm as cuda_add_rms_norm
        return cuda_add_rms_norm(x, y, norm.weight, norm.eps)
    if cpu_native.applies(x, y, norm.weight):
        return cpu_native.add_rms_norm(x, y, norm.weight, norm.eps)
    x = x + y
    return x, norm(x)


def norm_rotary(x: torch.Tensor, norm, rotary, positions: torch.Tensor) -> torch.Tensor:
    """Per-head q/k RMSNorm, then partial rotary: rotary(norm(x), positions). x [T, H, D]; positions [T]."""
    if x.is_cuda:
        from .triton.rowwise import norm_rotary as cuda_norm_rotary
        return cuda_norm_rotary(x, norm.weight, norm.eps, positions, rotary.rotary_dim, rotary.theta)
    return rotary(norm(x), positions)


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """SwiGLU: [T, 2I] rows [gate | up] -> SiLU(gate) * up [T, I]."""
    gate, up = h.chunk(2, dim=-1)
    if h.is_cuda:
        from .triton.rowwise import gate_mul
        return gate_mul(up, gate, sigmoid=False)
    return F.silu(gate) * up


def gated_norm_linear(x: torch.Tensor, z: torch.Tensor, norm, weight) -> torch.Tensor | None:
    """The delta-rule output of one row, x [1, H*Dv], through its gated RMS norm (gate z [1, H*Dv], `norm` a
    GatedRMSNorm) and the out-projection weight [N, H*Dv] (float or PlanarWeight) -> [1, N]: one CUDA launch, the
    norm in the GEMV's prologue (on int8 x: in x's quantization); None elsewhere (then: the norm and the
    projection)."""
    return _prologue_linear(x, z, norm.weight, norm.eps, weight, gated=True)


def sigmoid_gate_linear(x: torch.Tensor, gate: torch.Tensor, weight) -> torch.Tensor | None:
    """The attention output of one row, x [1, H*D], times sigmoid(gate) ([1, H, D], unit last stride) through the
    o-projection weight [N, H*D] -> [1, N]: as gated_norm_linear, the gate in the prologue; None elsewhere
    (then: sigmoid_gate and the projection)."""
    return _prologue_linear(x, gate, gate, 0., weight, gated=False)  # ungated: norm weight and eps unused


def _prologue_linear(x, z, norm_w, eps, weight, gated: bool) -> torch.Tensor | None:
    if not x.is_cuda or x.shape[0] != 1 or torch.is_grad_enabled():
        return None
    if isinstance(weight, PlanarWeight):
        from .triton.qlinear import norm_qlinear
        return norm_qlinear(x, z, norm_w, eps, weight, gated)
    if not isinstance(weight, torch.Tensor):
        return None
    from .triton.linear import norm_gemv
    return norm_gemv(x, z, norm_w, eps, weight, gated)


def swiglu_gemv(x: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor | None:
    """SiLU(gate) * up of one row x [1, D] times gate_up [2I, D] (rows [gate | up]) -> [1, I] in one launch (the
    CUDA GEMV with the SwiGLU in its epilogue: bf16/fp16 float weights or a PlanarWeight (on int8 x: two launches);
    no autograd); None elsewhere (then: the product and silu_mul)."""
    if not x.is_cuda or torch.is_grad_enabled():
        return None
    if isinstance(gate_up, PlanarWeight):
        from .triton.qlinear import swiglu_qgemv
        fused = swiglu_qgemv(x, gate_up)
        return None if fused is None else fused[1]
    if not isinstance(gate_up, torch.Tensor):
        return None
    from .triton.linear import swiglu_gemv as cuda_swiglu_gemv
    return cuda_swiglu_gemv(x, gate_up)


def add_norm_swiglu(x: torch.Tensor, y: torch.Tensor, norm, gate_up) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The residual add, the RMSNorm after it and a dense MLP's SwiGLU half for one row: (x + y, SiLU(h Wg^T) *
    (h Wu^T)) with h = norm(x + y), in one launch (CUDA GEMV: as swiglu_gemv; no autograd); None elsewhere (then:
    add_rms_norm and swiglu_gemv). x, y [1, D]; norm an RMSNorm; gate_up [2I, D] rows [gate | up]."""
    if not x.is_cuda or torch.is_grad_enabled():
        return None
    from .triton import linear as cuda_linear
    if not cuda_linear.ADD_NORM_PROLOGUE:
        return None
    if isinstance(gate_up, PlanarWeight):
        from .triton.qlinear import swiglu_qgemv
        return swiglu_qgemv(x, gate_up, y, norm.weight, norm.eps)
    if not isinstance(gate_up, torch.Tensor):
        return None
    return cuda_linear.add_norm_swiglu(x, y, norm.weight, norm.eps, gate_up)


def sigmoid_gate(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The gated attention output: x * sigmoid(gate), both [T, H, D]."""
    if x.is_cuda:
        from .triton.rowwise import gate_mul
        return gate_mul(x, gate, sigmoid=True)
    return x * torch.sigmoid(gate)


# One call where a fast path exists (CUDA; float32 CPU); None tells the layer to run its own torch code

def sparse_moe(x: torch.Tensor, moe) -> torch.Tensor | None:
    """The whole SparseMoE block (router, routed experts, shared expert) of [T, D] rows in one call: Triton on
    CUDA, the native kernel for float32 CPU rows on packed weights; None elsewhere (the module's torch code)."""
    if x.is_cuda:
        from .triton.moe import sparse_moe as cuda_sparse_moe
        return cuda_sparse_moe(x, moe.router.weight, moe.experts_gate_up, moe.experts_down, moe.shared.gate_up.weight,
                               moe.shared.down.weight, moe.shared_gate.weight, moe.top_k, moe.norm_topk)
    if x.shape[0] > 0 and cpu_native.is_packed(moe.experts_gate_up) and cpu_native.applies(x):
        return cpu_native.moe_block(x, moe)
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """Zero-centred RMSNorm of [R, D] or [R, B, D] rows in one call (CUDA, float32 CPU); None elsewhere."""
    if x.is_cuda:
        from .triton.rowwise import rms_norm as cuda_rms_norm
        return cuda_rms_norm(x, weight, eps)
    if cpu_native.applies(x, weight):
        return cpu_native.add_rms_norm(x, None, weight, eps)[1]
    return None


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight * SiLU(z) over [R, B, D] rows, in z's dtype (CUDA only; CPU: GatedRMSNorm's code)."""
    from .triton.rowwise import gated_rms_norm as cuda_gated_rms_norm
    return cuda_gated_rms_norm(x, z, weight, eps)
