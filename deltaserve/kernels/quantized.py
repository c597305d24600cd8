"""Weight matrices kept in the block formats their GGUF file stores (`QuantizedWeight`), and the torch reference
of a product on them (the oracle of the native kernels, and the path where those are not built).

A product on integer formats quantizes each activation row in blocks of 32, from that row alone: d = max|x| / 127,
q = round-half-even(x * (127 / max|x|)); the result is the exact product of the dequantized weights with q * d
(up to float rounding). Float formats (F32, F16, BF16) multiply the float activations.

N = output rows, K = inputs, E = experts, T = activation rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

Q = GGMLQuantizationType
# Formats the CPU kernels compute on as stored; the loader dequantizes any other type (with a warning)
KEPT = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS,
                  Q.MXFP4})
FLOAT_DTYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
QTYPE_OF_DTYPE = {dtype: qtype for qtype, dtype in FLOAT_DTYPES.items()}
ACT_BLOCK = 32


@dataclass
class QuantSegment:
    qtype: GGMLQuantizationType
    data: torch.Tensor  # uint8 [..., rows, row bytes]: the file's blocks, rows consecutive

    @property
    def rows(self) -> int:
        return self.data.shape[-2]


@dataclass
class QuantizedWeight:
    """A weight [N, K] (or an expert stack [E, N, K]) as consecutive row segments, each in one GGML type, and
    optionally a column permutation (model column j is stored column col_perm[j])."""
    shape: tuple[int, ...]
    segments: list[QuantSegment]
    col_perm: torch.Tensor | None = field(default=None)

    @property
    def nbytes(self) -> int:
        return sum(s.data.numel() for s in self.segments)

    @property
    def qtypes(self) -> list[str]:
        return [s.qtype.name for s in self.segments]

    def expert(self, e: int) -> QuantizedWeight:
        return QuantizedWeight(self.shape[1:], [QuantSegment(s.qtype, s.data[e]) for s in self.segments], self.col_perm)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [..., N, K] in the model's column order (rows: only these rows of a 2-D weight)."""
        if rows is None:
            out = torch.cat([dequantize_rows(s.qtype, s.data) for s in self.segments], dim=-2)
        else:  # only those rows, from the segment that holds each
            out, first = torch.empty(len(rows), self.shape[-1]), 0
            for s in self.segments:
                hit = (rows >= first) & (rows < first + s.rows)
                if hit.any():
                    out[hit] = dequantize_rows(s.qtype, s.data[rows[hit] - first])
                first += s.rows
        return out if self.col_perm is None else out[..., self.col_perm]


def segments_of(weight: torch.Tensor | QuantizedWeight) -> list[QuantSegment]:
    """A weight's row segments: a float tensor is one segment of its dtype (its bytes)."""
    if isinstance(weight, QuantizedWeight):
        return weight.segments
    return [QuantSegment(QTYPE_OF_DTYPE[weight.dtype], weight.detach().contiguous().view(torch.uint8))]


def dequantize_rows(qtype: GGMLQuantizationType, data: torch.Tensor) -> torch.Tensor:
    """uint8 [..., rows, row bytes] of one GGML type -> float32 [..., rows, K] (gguf-py's dequantizers)."""
    if qtype in FLOAT_DTYPES:
        return data.view(FLOAT_DTYPES[qtype]).float()
    block, size = GGML_QUANT_SIZES[qtype]
    arr = dequantize(data.numpy(), qtype)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(*data.shape[:-1],
                                                                                data.shape[-1] // size * block)


def is_integer(qtype: GGMLQuantizationType) -> bool:
    return qtype not in FLOAT_DTYPES


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """float32 [T, K] (K % 32 == 0) -> the dequantized int8 activations q * d the kernels multiply, [T, K]."""
    blocks = x.float().reshape(x.shape[0], -1, ACT_BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)  # [T, K/32, 1]
    # 127 / amax as one IEEE division, as the kernels compute it: torch's scalar / tensor multiplies by a reciprocal,
    # an ulp off for a quarter of the values, enough to round x * inv = 63.5 - ulp the other way
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv)  # half to even, as the kernels' conversion
    return (q * (amax / 127.0)).reshape(x.shape)


def quantized_linear(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """x [..., K] @ w^T -> [..., N] float32, computed as the native kernels define it (see the module doc)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    if w.col_perm is not None:
        rows = rows[:, torch.argsort(w.col_perm)]  # the stored column order
    outs = []
    for s in w.segments:
        xs = quantize_activations(rows) if is_integer(s.qtype) else rows
        outs.append(xs @ dequantize_rows(s.qtype, s.data).T)
    return torch.cat(outs, dim=-1).view(*x.shape[:-1], w.shape[-2])
