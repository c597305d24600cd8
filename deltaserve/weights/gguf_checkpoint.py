"""A GGUF file seen as a Hugging Face checkpoint: names(), shape(name), get(name), like SafetensorsDir.

Tensors are dequantized lazily, one get() at a time, from the memory-mapped file; a progress bar
follows the bytes read for large files. `memory_report()` says what the dequantized weights take.
"""

from __future__ import annotations

import logging
from collections import Counter
from math import prod
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import ModelConfig
from .gguf_config import config_from_gguf
from .gguf_file import GGUFFile
from .gguf_plan import plan_sources

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
        self.float32_bytes = sum(prod(s.shape) * 4 for s in self._sources.values())
        self._types = Counter(file.type_name(p) for p in parts)
        show = self.file_bytes >= PROGRESS_MIN_BYTES if progress is None else progress
        self._bar = tqdm(total=self.file_bytes, unit="B", unit_scale=True, desc=f"loading {file.path.name}",
                         disable=not show, leave=False)
        log.info(self.memory_report())

    def names(self) -> set[str]:
        return set(self._sources)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._sources[name].shape

    def get(self, name: str) -> torch.Tensor:
        """The HF tensor `name` in float32, rebuilt from its dequantized GGUF parts."""
        src = self._sources[name]
        out = src.build([self.file.read(p) for p in src.parts])
        for p in src.parts:
            if p in self._unread:
                self._unread.discard(p)
                self._bar.update(self.file.data_bytes(p))
        if not self._unread:
            self._bar.close()
        return out

    def memory_report(self) -> str:
        """e.g. 'm.gguf: 1.02 GiB of tensor data (Q8_0 x280, F32 x97), dequantized 3.80 GiB as float32, 1.90 GiB
        as bfloat16/float16' (the model keeps one of the two; loading holds one extra float32 tensor at a time)."""
        types = ", ".join(f"{t} x{n}" for t, n in self._types.most_common())
        return (f"{self.file.path.name}: {_size(self.file_bytes)} of tensor data ({types}), dequantized "
                f"{_size(self.float32_bytes)} as float32, {_size(self.float32_bytes // 2)} as bfloat16/float16")


def open_gguf(path: str | Path, progress: bool | None = None) -> tuple[GGUFCheckpoint, ModelConfig]:
    """(checkpoint with HF tensor names, config) for a qwen3next / qwen35 / qwen35moe GGUF file."""
    file = GGUFFile(path)
    cfg, n_mtp = config_from_gguf(file)
    return GGUFCheckpoint(file, cfg, n_mtp, progress), cfg
