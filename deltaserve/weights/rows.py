"""Fusing weight matrices that stay in their stored formats: the same row moves as on float tensors.

The fusion functions of the checkpoint layouts (hf_layout recipes, gguf_plan builds) only move whole rows: cat,
split, view and transpose of the leading dimensions. `combine_rows` runs such a function on row numbers instead
of rows, then gathers each output row from whichever part holds it, in that part's format. A fused projection
whose parts a file stores in different formats (Q4_K_M keeps attn_v in Q6_K beside Q4_K q and k) becomes one
QuantizedWeight with a segment per run of rows of one format.

N = rows of a matrix, K = columns, L = leading (expert) dims flattened.
"""

from __future__ import annotations

from math import prod
from typing import Callable

import torch
from gguf import GGMLQuantizationType

from ..kernels.quantized import FLOAT_DTYPES, QuantizedWeight, QuantSegment, segments_of

Part = torch.Tensor | QuantizedWeight


def combine_rows(build: Callable[[list], torch.Tensor], parts: list[Part]) -> Part:
    """build(parts) for weights that may be quantized: a float tensor when every row ends up in one float dtype,
    else a QuantizedWeight. `build` must only move whole rows (its output's last dim is the parts' last dim)."""
    if all(isinstance(p, torch.Tensor) for p in parts) and len({p.dtype for p in parts}) == 1:
        return build(parts)
    if any(isinstance(p, QuantizedWeight) and p.col_perm is not None for p in parts):
        rows = torch.arange(prod(parts[0].shape[:-1])).view(*parts[0].shape[:-1], 1)
        if len(parts) != 1 or not torch.equal(build([rows]), rows):
            raise ValueError("a column-permuted weight cannot be fused with others or have its rows moved")
        return parts[0]
    k = parts[0].shape[-1]
    qtype_of, pos_of, tables = [], [], {}  # per global row: its format and index in that format's table
    ids, offset = [], 0
    for part in parts:
        n, lead = part.shape[-2] if len(part.shape) > 1 else 1, prod(part.shape[:-2])
        ids.append(torch.arange(offset, offset + n * lead).view(*part.shape[:-1], 1))
        row_q = torch.empty(lead, n, dtype=torch.int64)
        row_p = torch.empty(lead, n, dtype=torch.int64)
        n0 = 0
        for s in segments_of(part):
            table = tables.setdefault(s.qtype, [])
            start = sum(t.shape[0] for t in table)
            rows = s.data.reshape(lead * s.rows, -1)
            table.append(rows)
            row_q[:, n0:n0 + s.rows] = int(s.qtype)
            row_p[:, n0:n0 + s.rows] = start + torch.arange(lead * s.rows).view(lead, s.rows)
            n0 += s.rows
        qtype_of.append(row_q.reshape(-1))
        pos_of.append(row_p.reshape(-1))
        offset += n * lead
    order = build(ids)[..., 0]  # [..., N] global row numbers in the output's order
    qtype_of, pos_of = torch.cat(qtype_of), torch.cat(pos_of)
    flat = order.reshape(-1, order.shape[-1])  # [L, N]
    fmt = qtype_of[flat]
    if not torch.equal(fmt, fmt[:1].expand_as(fmt)):
        raise ValueError("experts of one stack would mix formats row by row")
    tables = {q: torch.cat(t) if len(t) > 1 else t[0] for q, t in tables.items()}
    segments, n0 = [], 0
    runs = torch.unique_consecutive(fmt[0], return_counts=True)
    for q, count in zip(*(r.tolist() for r in runs)):
        qtype = GGMLQuantizationType(q)
        data = tables[qtype][pos_of[flat[:, n0:n0 + count]]]  # [L, rows, row bytes]
        segments.append(QuantSegment(qtype, data.reshape(*order.shape[:-1], count, -1)))
        n0 += count
    shape = (*order.shape, k)
    if len(segments) == 1 and segments[0].qtype in FLOAT_DTYPES:
        return segments[0].data.view(FLOAT_DTYPES[segments[0].qtype]).reshape(shape)
    return QuantizedWeight(shape, segments)
