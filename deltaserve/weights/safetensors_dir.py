"""Reads a Hugging Face checkpoint directory: one `model.safetensors` or shards listed in an index.

Names are normalised to the text-only layout: a *ForConditionalGeneration checkpoint's
`model.language_model.*` becomes `model.*`; its vision tower (`model.visual.*`) is skipped.
Tensors are read lazily (memory-mapped by safetensors), one at a time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint that does not match its config; the message names the tensor."""


SKIPPED_PREFIXES = ("model.visual.", "visual.")
DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
               "I8": 1, "U8": 1, "BOOL": 1}


def _normalise(name: str) -> str | None:
    if name.startswith(SKIPPED_PREFIXES):
        return None
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


class SafetensorsDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no model.safetensors, index or *.safetensors files")
        self._where: dict[str, tuple[str, str]] = {}  # normalised name -> (file, name in file)
        self._shape: dict[str, tuple[int, ...]] = {}
        self._handles = {}
        self.file_bytes = 0  # the tensors' bytes as stored
        for fname in files:
            fpath = self.path / fname
            if not fpath.is_file():
                raise CheckpointError(f"{self.path}: shard {fname} listed in the index is missing")
            try:
                handle = safe_open(str(fpath), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{fpath}: not a readable safetensors file ({e})") from None
            self._handles[fname] = handle
            for raw in handle.keys():
                name = _normalise(raw)
                if name is not None:
                    info = handle.get_slice(raw)
                    self._where[name] = (fname, raw)
                    self._shape[name] = tuple(info.get_shape())
                    self.file_bytes += math.prod(self._shape[name]) * DTYPE_BYTES.get(info.get_dtype(), 4)

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def get_stored(self, name: str) -> torch.Tensor:
        """The tensor in the dtype the file stores it in (get does the same: safetensors holds plain tensors)."""
        return self.get(name)

    def get(self, name: str) -> torch.Tensor:
        fname, raw = self._where[name]
        try:
            return self._handles[fname].get_tensor(raw)
        except Exception as e:
            raise CheckpointError(f"{self.path / fname}: cannot read tensor '{raw}' ({e})") from None
