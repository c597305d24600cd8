"""A GGUF file seen as a Hugging Face checkpoint: names(), shape(name), get(name), like SafetensorsDir, and
get_stored(name): a weight matrix in the formats the file stores it in (see weights/rows.py).

Tensors are read lazily, one get at a time; a progress bar follows the bytes read for large files.
`memory_report()` says what the file's tensors take and what dequantizing them would.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import ModelConfig
from ..kernels.quantized import QuantizedWeight
from .gguf_config import config_from_gguf
from .gguf_file import GGUFFile
from .gguf_plan import plan_sources
from .rows import combine_rows

log = logging.getLogger(__name__)
PROGRESS_MIN_BYTES = 1 << 30  # show a progress bar from 1 GiB of tensor data


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class GGUFCheckpoint:
    def __init__(self, file: GGUFFile, cfg: ModelConfig, n_mtp: int, progress: bool | None = None):
        self.file = file
        self._sources = plan_sources(file, cfg, n_mtp)
        parts = {p for s in self._sources.values() for p in s.parts}
        self._unread = set(parts)
        self.file_bytes = sum(file.data_bytes(p) for p in parts)
        self._types = Counter(file.type_name(p) for p in parts)
        show = self.file_bytes >= PROGRESS_MIN_BYTES if progress is None else progress
        self._bar = tqdm(total=self.file_bytes, unit="B", unit_scale=True, desc=f"loading {file.path.name}",
                         disable=not show, leave=False)
        log.info(self.memory_report())

    def names(self) -> set[str]:
        return set(self._sources)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._sources[name].shape

    def reads_rows(self, name: str) -> bool:
        """GGUF tensors are rebuilt whole (llama.cpp's conventions undone), so a shard is cut after reading."""
        return False

    def get(self, name: str) -> torch.Tensor:
        """The HF tensor `name` in float32, rebuilt from its dequantized GGUF parts."""
        src = self._sources[name]
        out = src.build([self.file.read(p) for p in src.parts])
        self._read(src.parts)
        return out

    def get_stored(self, name: str) -> torch.Tensor | QuantizedWeight:
        """The HF weight matrix `name` with its rows in the formats the file stores them in (float tensors where
        that is one float dtype); a column permutation is kept as QuantizedWeight.col_perm."""
        src = self._sources[name]
        parts = [self.file.read_stored(p) for p in src.parts]
        self._read(src.parts)
        if src.moves_columns and isinstance(parts[0], QuantizedWeight):
            k = parts[0].shape[-1]
            perm = src.build([torch.arange(k).view(1, k)])[0]  # the same move on column numbers
            return replace(parts[0], col_perm=perm)
        return combine_rows(src.build, parts)

    def _read(self, parts: tuple[str, ...]) -> None:
        for p in parts:
            if p in self._unread:
                self._unread.discard(p)
                self._bar.update(self.file.data_bytes(p))
        if not self._unread:
            self._bar.close()

    def memory_report(self) -> str:
        """e.g. 'm.gguf: 201.4 MiB of tensor data (Q4_K x69, F32 x61, Q6_K x13)'."""
        types = ", ".join(f"{t} x{n}" for t, n in self._types.most_common())
        return f"{self.file.path.name}: {_size(self.file_bytes)} of tensor data ({types})"


def open_gguf(path: str | Path, progress: bool | None = None) -> tuple[GGUFCheckpoint, ModelConfig]:
    """(checkpoint with HF tensor names, config) for a qwen3next / qwen35 / qwen35moe GGUF file."""
    file = GGUFFile(path)
    cfg, n_mtp = config_from_gguf(file)
    return GGUFCheckpoint(file, cfg, n_mtp, progress), cfg
