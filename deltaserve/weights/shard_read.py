"""A tensor-parallel rank's slice of a parameter, reading only the rows and columns it needs from the checkpoint.

The recipe's fusion (hf_layout) is run on row numbers (as weights/rows.py does), the rank's rule
(parallel/shard.py) is applied to them, and each source tensor is read in runs of consecutive rows, columns cut
to the rank's range where the rule splits columns. A checkpoint without row reads (GGUF), an FP8 tensor, or a
replicated or one-dimensional parameter is read whole, one tensor at a time.

A weight matrix that stays in its stored format (GGUF blocks, FP8 codes, bf16) is sharded the same way before it
is fused (`rank_plan`, `columns_of`): the rank's rows through the recipe's row moves, its columns as whole blocks.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import torch
from gguf import GGML_QUANT_SIZES

from ..config import ModelConfig
from ..kernels.gpu_quant import FP8_BLOCK
from ..kernels.quantized import QuantSegment
from ..parallel.shard import shard_param


def read_shard(ckpt, recipe, param: str, cfg: ModelConfig, rank: int, size: int) -> torch.Tensor:
    """shard_param(param, recipe.combine(the full sources), cfg, rank, size), reading only what it keeps."""
    full = recipe.combine([torch.empty(shape, device="meta") for _, shape in recipe.sources]).shape
    probe = shard_param(param, torch.empty(full, device="meta"), cfg, rank, size).shape
    names = [name for name, _ in recipe.sources]
    if probe == full or len(full) < 2 or not all(ckpt.reads_rows(n) for n in names):
        return shard_param(param, recipe.combine([ckpt.get(n) for n in names]), cfg, rank, size)
    k = full[-1]
    cols = slice(rank * k // size, (rank + 1) * k // size) if probe[-1] != k else slice(0, k)
    ids, offset = [], 0
    for _, shape in recipe.sources:
        ids.append(torch.arange(offset, offset + math.prod(shape[:-1])).view(*shape[:-1], 1))
        offset += math.prod(shape[:-1])
    order = recipe.combine(ids)  # [..., 1]: the source row of every row of the full parameter
    local = order if probe[-1] != k else shard_param(param, order, cfg, rank, size)
    rows, inverse = torch.unique(local.flatten(), return_inverse=True)  # ascending: sources in order
    parts, start = [], 0
    for name, shape in recipe.sources:
        n = math.prod(shape[:-1])
        mine = rows[(rows >= start) & (rows < start + n)] - start
        if len(mine):
            parts.append(ckpt.get_rows(name, mine, cols))
        start += n
    return torch.cat(parts)[inverse].view(*local.shape[:-1], cols.stop - cols.start)


def rank_plan(param: str, recipe, cfg: ModelConfig, rank: int, size: int) -> tuple[Callable, slice | None]:
    """(build, cols) for a weight kept in its stored format: the rank's shard of param is build(each source's
    columns cols, or whole sources where cols is None). build still only moves whole rows (weights/rows.py runs it
    on row numbers): the recipe's fusion, then shard_param's row selection where the rank splits rows."""
    if size == 1:
        return recipe.combine, None
    full = recipe.combine([torch.empty(shape, device="meta") for _, shape in recipe.sources]).shape
    k = full[-1]
    if shard_param(param, torch.empty(full, device="meta"), cfg, rank, size).shape[-1] != k:
        return recipe.combine, slice(rank * k // size, (rank + 1) * k // size)  # row-parallel: columns split
    return (lambda parts: shard_param(param, recipe.combine(parts), cfg, rank, size)), None


def columns_of(part, cols: slice | None):
    """Columns cols (in the model's order) of a source in its stored format: a float tensor sliced; a
    QuantizedWeight's blocks holding them (its column permutation carried over); an FP8 part's (codes, scales)
    in whole 128-column blocks. None where cols do not cover whole blocks (then the caller reads floats)."""
    if cols is None:
        return part
    if isinstance(part, torch.Tensor):
        return part[..., cols]
    if isinstance(part, tuple):  # FP8 (codes [..., N, K], scale_inv [..., N/128, K/128])
        codes, scale = part
        k = codes.shape[-1]
        if cols.start % FP8_BLOCK or cols.stop % FP8_BLOCK and cols.stop != k:
            return None
        return codes[..., cols], scale[..., cols.start // FP8_BLOCK:-(-cols.stop // FP8_BLOCK)]
    k = part.shape[-1]
    wanted = torch.arange(k)[cols] if part.col_perm is None else part.col_perm[cols]  # stored columns
    block = math.lcm(*(GGML_QUANT_SIZES[s.qtype][0] for s in part.segments))
    kept, counts = torch.unique(wanted // block, return_counts=True)
    if (counts != block).any():
        return None
    # model column j of the shard: its stored column's place among the kept blocks
    slot = torch.full((k // block,), -1, dtype=torch.long)
    slot[kept] = torch.arange(len(kept))
    perm = slot[wanted // block] * block + wanted % block
    segments = []
    for s in part.segments:
        b, nbytes = GGML_QUANT_SIZES[s.qtype]
        per = block // b  # the segment's blocks per kept block
        data = s.data.unflatten(-1, (k // block, per * nbytes))[..., kept, :].flatten(-2)
        segments.append(QuantSegment(s.qtype, data.contiguous()))
    identity = torch.equal(perm, torch.arange(len(perm)))
    return replace(part, shape=(*part.shape[:-1], len(perm)), segments=segments,
                   col_perm=None if identity else perm)
