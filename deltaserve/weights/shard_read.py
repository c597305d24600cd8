"""A tensor-parallel rank's slice of a parameter, reading only the rows and columns it needs from the checkpoint.

The recipe's fusion (hf_layout) is run on row numbers (as weights/rows.py does), the rank's rule
(parallel/shard.py) is applied to them, and each source tensor is read in runs of consecutive rows, columns cut
to the rank's range where the rule splits columns. A checkpoint without row reads (GGUF), an FP8 tensor, or a
replicated or one-dimensional parameter is read whole, one tensor at a time.
"""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig
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
