"""Weight matrices in the layouts the CUDA kernels compute on (`PlanarWeight`), and their torch reference.

A file's quantized blocks are split at load into planes with rows self-contained and values in their natural
column order, so a kernel reads the codes of W[rows, k0:k0+BK] as one tile and each group's scale beside them.
Formats (w = the dequantized value; N rows, K columns; planes [..., N, *]):
- fp8   (Qwen's block-FP8 checkpoints): q float8_e4m3fn [N, K]; s float32 [N / RB, ceil(K / 128)];
        w = q * s[n // RB, k // 128]  (RB = row_block: 128 as in the file, 1 where fusion moved rows apart).
- q8_0  q int8 [N, K]; s float16 [N, K / 32]; w = q * s[k // 32].
- q4_k  q uint8 [N, K / 2] (value 2j in the low nibble of byte j, 2j+1 in the high); s uint8 [N, K / 32, 2]
        (6-bit scale, 6-bit min); d float16 [N, K / 256, 2] (d, dmin); w = d * sc * q - dmin * m.
- q5_k  as q4_k, and q2 uint8 [N, K / 8] (the fifth bit, value 8j + i at bit i of byte j); w = d * sc * q - dmin * m.
- q6_k  q uint8 [N, K / 2] (low 4 bits as q4_k); q2 uint8 [N, K / 4] (high 2 bits, value 4j + i at bits 2i of
        byte j); s int8 [N, K / 16]; d float16 [N, K / 256]; w = d * sc * (q - 32).
- plain a float tensor [N, K] in the model's dtype (rows a file keeps unquantized, fused with quantized ones).
The same bytes as the file, but for the K-quants' (+1/8 bit per weight for q4_k and q5_k) and fp8's row-block scales.
A weight is a list of row segments, one format each (a Q4_K_M file fuses Q6_K v rows with Q4_K q and k rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from gguf import GGMLQuantizationType as Q

from .quantized import FLOAT_DTYPES, QuantizedWeight, QuantSegment

FORMATS = ("plain", "fp8", "q8_0", "q4_k", "q6_k", "q5_k")  # index = the kernels' FMT constant
GGUF_FORMATS = {Q.Q8_0: "q8_0", Q.Q4_K: "q4_k", Q.Q5_K: "q5_k", Q.Q6_K: "q6_k"}
FP8_BLOCK = 128


@dataclass
class PlanarSegment:
    fmt: str
    q: torch.Tensor  # codes [..., rows, *]
    s: torch.Tensor | None = None  # group scales
    q2: torch.Tensor | None = None  # q6_k: the high bits
    d: torch.Tensor | None = None  # q4_k / q6_k: super-block scales
    row_block: int = 1  # fp8: rows that share a scale row

    @property
    def rows(self) -> int:
        return self.q.shape[-2]

    def planes(self) -> list[torch.Tensor]:
        return [p for p in (self.q, self.s, self.q2, self.d) if p is not None]

    def map(self, fn) -> PlanarSegment:
        """The segment with fn applied to each plane (fp8's shared scale rows need whole blocks: see expert())."""
        return replace(self, **{k: fn(getattr(self, k)) for k in ("q", "s", "q2", "d") if getattr(self, k) is not None})


@dataclass
class PlanarWeight:
    """A weight [N, K] (or an expert stack [E, N, K]) as row segments in the formats above; col_perm as in
    QuantizedWeight (model column j is stored column col_perm[j]); dtype: the activations' (products and
    embedding rows come out in it)."""
    shape: tuple[int, ...]
    segments: list[PlanarSegment]
    col_perm: torch.Tensor | None = field(default=None)
    dtype: torch.dtype = torch.float32
    x_order: torch.Tensor | None = field(default=None, init=False, repr=False)  # argsort(col_perm): x in stored order

    def __post_init__(self):
        self.x_order = None if self.col_perm is None else torch.argsort(self.col_perm)  # once, not per product

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for s in self.segments for p in s.planes())

    @property
    def fmt(self) -> str:
        """The format of a one-segment weight ('mixed' otherwise)."""
        return self.segments[0].fmt if len(self.segments) == 1 else "mixed"

    def expert(self, e: int) -> PlanarWeight:
        return replace(self, shape=self.shape[1:], segments=[s.map(lambda p: p[e]) for s in self.segments])

    def to(self, device) -> PlanarWeight:
        perm = None if self.col_perm is None else self.col_perm.to(device)
        return replace(self, segments=[s.map(lambda p: p.to(device)) for s in self.segments], col_perm=perm)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [..., N, K] in the model's column order (rows: only these rows of a 2-D weight)."""
        if rows is None:
            out = torch.cat([dequantize_segment(s, self.shape[-1]) for s in self.segments], dim=-2)
        else:  # rows from each segment (index arithmetic only: no host sync, so CUDA graphs may capture it)
            out, first = None, 0
            for s in self.segments:
                local = (rows - first).clamp(0, s.rows - 1)
                part = dequantize_segment(_rows_of(s, local), self.shape[-1])
                hit = ((rows >= first) & (rows < first + s.rows))[:, None]
                out = part if out is None else torch.where(hit, part, out)
                first += s.rows
        return out if self.col_perm is None else out[..., self.col_perm]


def _rows_of(s: PlanarSegment, rows: torch.Tensor) -> PlanarSegment:
    if s.fmt != "fp8":
        return s.map(lambda p: p[rows])
    return replace(s, q=s.q[rows], s=s.s[rows // s.row_block], row_block=1)


def dequantize_segment(s: PlanarSegment, k: int) -> torch.Tensor:
    """float32 [..., rows, K] of one segment: the definition the kernels compute."""
    if s.fmt == "plain":
        return s.q.float()
    if s.fmt == "fp8":
        scale = s.s.repeat_interleave(s.row_block, -2)[..., :s.rows, :].repeat_interleave(FP8_BLOCK, -1)[..., :k]
        return s.q.float() * scale
    if s.fmt == "q8_0":
        return (s.q.float().unflatten(-1, (-1, 32)) * s.s.float()[..., None]).flatten(-2)
    low = torch.stack([s.q & 15, s.q >> 4], dim=-1).flatten(-2)  # [..., rows, K] natural order
    if s.fmt == "q5_k":
        low = low | (torch.stack([(s.q2 >> i) & 1 for i in range(8)], dim=-1).flatten(-2) << 4)
    if s.fmt in ("q4_k", "q5_k"):
        d = s.d.float().repeat_interleave(8, -2)  # [..., rows, K/32, 2] per 32 values
        scale, low_end = d[..., 0] * s.s[..., 0].float(), d[..., 1] * s.s[..., 1].float()
        return (low.float().unflatten(-1, (-1, 32)) * scale[..., None] - low_end[..., None]).flatten(-2)
    high = torch.stack([(s.q2 >> sh) & 3 for sh in (0, 2, 4, 6)], dim=-1).flatten(-2)
    codes = (low | (high << 4)).float() - 32
    scale = s.d.float().repeat_interleave(16, -1) * s.s.float()  # [..., rows, K/16]
    return (codes.unflatten(-1, (-1, 16)) * scale[..., None]).flatten(-2)


def _pairs(codes: torch.Tensor) -> torch.Tensor:
    """uint8 values < 16 [..., K] -> [..., K/2]: value 2j in byte j's low nibble, 2j+1 in its high nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def from_gguf_segment(seg: QuantSegment, dtype: torch.dtype) -> PlanarSegment | None:
    """One GGUF row segment [..., rows, row bytes] in planar form; float segments become plain (in dtype).
    None for a block type the CUDA kernels do not compute on."""
    if seg.qtype in FLOAT_DTYPES:
        return PlanarSegment("plain", seg.data.view(FLOAT_DTYPES[seg.qtype]).to(dtype))
    fmt = GGUF_FORMATS.get(seg.qtype)
    if fmt is None:
        return None
    size = {"q8_0": 34, "q4_k": 144, "q5_k": 176, "q6_k": 210}[fmt]
    b = seg.data.unflatten(-1, (-1, size))  # [..., rows, blocks, size]
    lead = b.shape[:-2]
    if fmt == "q8_0":
        return PlanarSegment(fmt, b[..., 2:].contiguous().view(torch.int8).flatten(-2),
                             s=b[..., :2].contiguous().view(torch.float16)[..., 0])
    if fmt in ("q4_k", "q5_k"):
        sc = b[..., 4:16].to(torch.int32)  # 12 bytes: 6-bit scales and mins of 8 sub-blocks
        low6 = torch.cat([sc[..., 0:4] & 63, sc[..., 4:8] & 63], -1)  # scales 0-3 | mins 0-3
        scales = torch.cat([low6[..., :4], (sc[..., 8:12] & 15) | ((sc[..., 0:4] >> 6) << 4)], -1)
        mins = torch.cat([low6[..., 4:], (sc[..., 8:12] >> 4) | ((sc[..., 4:8] >> 6) << 4)], -1)
        qs = b[..., -128:].unflatten(-1, (4, 32))  # 4 chunks of 64 values: low nibbles first, then high
        codes = torch.stack([qs & 15, qs >> 4], dim=-2).flatten(-3)  # [..., blocks, 256] natural order
        high = None
        if fmt == "q5_k":  # value 32i + l's fifth bit at bit i of qh byte l -> value 8j + i at bit i of byte j
            qh = b[..., 16:48]
            bits = torch.stack([(qh >> i) & 1 for i in range(8)], dim=-2).flatten(-2)  # [..., blocks, 256]
            bits = bits.flatten(-2).unflatten(-1, (-1, 8))
            high = sum(bits[..., i] << i for i in range(8)).to(torch.uint8)
        return PlanarSegment(fmt, _pairs(codes.flatten(-2)),
                             s=torch.stack([scales, mins], -1).to(torch.uint8).flatten(-3, -2), q2=high,
                             d=b[..., :4].contiguous().view(torch.float16).view(*lead, -1, 2))
    ql = b[..., :128].unflatten(-1, (2, 64))  # value 128h + 64i + j: nibble i of ql byte 64h + j
    qh = b[..., 128:192].unflatten(-1, (2, 32))  # value 128h + 32i + j: bits 2i of qh byte 32h + j
    low = torch.stack([ql & 15, ql >> 4], dim=-2).flatten(-3)  # [..., blocks, 256]
    high = torch.stack([(qh >> sh) & 3 for sh in (0, 2, 4, 6)], dim=-2).flatten(-3)
    high = high.flatten(-2).unflatten(-1, (-1, 4))  # [..., K/4, 4]
    return PlanarSegment(fmt, _pairs(low.flatten(-2)),
                         s=b[..., 192:208].contiguous().view(torch.int8).flatten(-2),
                         q2=high[..., 0] | (high[..., 1] << 2) | (high[..., 2] << 4) | (high[..., 3] << 6),
                         d=b[..., 208:210].contiguous().view(torch.float16)[..., 0])


def from_quantized(w: QuantizedWeight, dtype: torch.dtype) -> PlanarWeight | None:
    """A GGUF weight in planar form; None if one of its segments is a type the CUDA kernels lack, or for an expert
    stack the MoE kernels cannot read (several formats, or permuted columns)."""
    if len(w.shape) == 3 and (len(w.segments) != 1 or w.col_perm is not None):
        return None
    segments = [from_gguf_segment(s, dtype) for s in w.segments]
    if any(s is None for s in segments):
        return None
    return PlanarWeight(tuple(w.shape), segments, w.col_perm, dtype)
