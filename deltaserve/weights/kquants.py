"""Q4_K, Q5_K and Q6_K quantizers (gguf-py ships dequantizers for the K-quants but no quantizers).

Byte layouts are ggml's, written as the exact inverse of gguf-py's dequantizers, which the tests use
as the oracle. Scales are chosen by plain min/max rounding (llama.cpp additionally searches for
error-minimising scales), so files are valid but a little less accurate than llama-quantize's.

N = super-blocks of 256 values; each holds sub-blocks of 16 (Q6_K) or 32 (Q4_K, Q5_K) values.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QK = 256


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, torch.ones_like(b), b))


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.half().reshape(-1, 1).view(torch.uint8)  # [N, 2]


def q6_k_blocks(x: torch.Tensor) -> torch.Tensor:
    """[N, 256] float32 -> [N, 210] bytes: ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16], f16 d."""
    n = x.shape[0]
    g = x.reshape(n, 16, 16)
    # signed scale per sub-block: its largest-magnitude value maps to -32, the end with the wider range
    idx = g.abs().argmax(dim=2, keepdim=True)
    s = -torch.gather(g, 2, idx)[..., 0] / 32  # [N, 16]
    d = (s.abs().amax(dim=1) / 127).half().float()  # [N]
    sc = torch.round(_div(s, d[:, None])).clamp(-127, 127)  # [N, 16]
    step = (d[:, None] * sc)[..., None]  # [N, 16, 1]
    q = torch.round(_div(g, step)).clamp(-32, 31).to(torch.int16).reshape(n, QK) + 32  # 0..63

    # element e = 128*h + r lives in ql byte 64*h + r%64 (nibble r//64) and qh byte 32*h + r%32 (bits 2*(r//32))
    q = q.reshape(n, 2, 128)
    lo, hi = (q & 0xF).to(torch.uint8), (q >> 4).to(torch.uint8)
    ql = lo[..., :64] | (lo[..., 64:] << 4)  # [N, 2, 64]
    qh = hi[..., 0:32] | (hi[..., 32:64] << 2) | (hi[..., 64:96] << 4) | (hi[..., 96:128] << 6)  # [N, 2, 32]
    return torch.cat([ql.reshape(n, 128), qh.reshape(n, 64), sc.to(torch.int8).view(torch.uint8),
                      _f16_bytes(d)], dim=1)


def _k_codes(x: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, 256] float32 -> (f16 bytes of d and dmin [N, 4], 12 bytes of 6-bit scales/mins [N, 12], codes 0..top
    [N, 8, 32]) of Q4_K (top 15) and Q5_K (top 31): value = d*sc*q - dmin*m per sub-block of 32."""
    n = x.shape[0]
    g = x.reshape(n, 8, 32)
    lo_v = g.amin(dim=2).clamp_max(0)  # m >= 0, so the offset is <= 0
    scale = (g.amax(dim=2) - lo_v) / top  # [N, 8]
    d = (scale.amax(dim=1) / 63).half().float()
    dmin = ((-lo_v).amax(dim=1) / 63).half().float()
    sc = torch.round(_div(scale, d[:, None])).clamp(0, 63).to(torch.uint8)
    m = torch.round(_div(-lo_v, dmin[:, None])).clamp(0, 63).to(torch.uint8)
    step, offset = (d[:, None] * sc)[..., None], (dmin[:, None] * m)[..., None]
    q = torch.round(_div(g + offset, step)).clamp(0, top).to(torch.uint8)  # [N, 8, 32]
    # scales 0-3 / mins 0-3 in the low 6 bits of bytes 0-3 / 4-7; scales and mins 4-7 split 4+2 bits
    packed = torch.cat([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6),
                        (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)], dim=1)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin)], dim=1), packed, q


def _low_nibbles(q: torch.Tensor) -> torch.Tensor:
    """codes [N, 8, 32] -> qs [N, 128]: sub-blocks 2c (low nibble) and 2c+1 (high) share 32 bytes."""
    low = q & 0xF
    return (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(q.shape[0], 128)


def q4_k_blocks(x: torch.Tensor) -> torch.Tensor:
    """[N, 256] float32 -> [N, 144] bytes: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, qs[128]."""
    d, packed, q = _k_codes(x, 15)
    return torch.cat([d, packed, _low_nibbles(q)], dim=1)


def q5_k_blocks(x: torch.Tensor) -> torch.Tensor:
    """[N, 256] float32 -> [N, 176] bytes: as Q4_K with qh[32] before qs, value 32i + l's fifth bit at bit i of
    qh byte l."""
    d, packed, q = _k_codes(x, 31)
    qh = sum(((q[:, i] >> 4) << i) for i in range(8)).to(torch.uint8)  # [N, 32]
    return torch.cat([d, packed, qh, _low_nibbles(q)], dim=1)


K_QUANTIZERS = {GGMLQuantizationType.Q6_K: q6_k_blocks, GGMLQuantizationType.Q4_K: q4_k_blocks,
                GGMLQuantizationType.Q5_K: q5_k_blocks}


def quantize_k(rows: np.ndarray | torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray | torch.Tensor:
    """[..., C] float (C a multiple of 256) -> [..., C / 256 * type_size] uint8, as gguf-py stores it; a torch
    tensor (on any device) gives a torch tensor, a numpy array a numpy array."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    x = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)) if isinstance(rows, np.ndarray) else rows
    blocks = K_QUANTIZERS[qtype](x.float().reshape(-1, QK))
    out = blocks.reshape(*x.shape[:-1], x.shape[-1] // QK * type_size)
    return out.numpy() if isinstance(rows, np.ndarray) else out
