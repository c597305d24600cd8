"""One GGUF file, memory-mapped: typed metadata look-ups and per-tensor dequantization to float32.

Everything that can be checked before reading tensor data is checked when the file is opened
(magic, header, tensor types, every tensor's byte range against the file size), so a truncated or
corrupt file fails at once with the tensor or key named, never deep inside the model.
"""

from __future__ import annotations

from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from .safetensors_dir import CheckpointError

Q = GGMLQuantizationType
# Types dequantized at load (by gguf-py's reference dequantizers); anything else names itself in the error
LOADABLE = frozenset({
    Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
    Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ4_NL, Q.IQ4_XS,
    Q.TQ1_0, Q.TQ2_0, Q.MXFP4,
})
_MISSING = object()


class _CheckedReader(GGUFReader):
    """gguf-py's reader, plus a check of each tensor's type and byte range before it maps the data."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        size = len(self.data)
        for field in fields:
            _, name_data, _, dims, raw_type, offset = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            try:
                qtype = Q(int(raw_type[0]))
            except ValueError:
                raise CheckpointError(f"tensor '{name}' has unknown GGML type id {int(raw_type[0])}") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            ne = [int(d) for d in dims]
            if ne and ne[0] % block:
                raise CheckpointError(f"tensor '{name}': row length {ne[0]} is not a multiple of the "
                                      f"{qtype.name} block size {block}")
            end = start_offs + int(offset[0]) + prod(ne) // block * type_size
            if end > size:
                raise CheckpointError(f"tensor '{name}' ({qtype.name}, shape {ne[::-1]}) needs bytes up to {end}, "
                                      f"but the file has only {size} bytes (truncated file?)")
        super()._build_tensors(start_offs, fields)


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such GGUF file")
        try:
            self.reader = _CheckedReader(self.path)
        except CheckpointError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: not a readable GGUF file, truncated or corrupt header "
                                  f"({type(e).__name__}: {e})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        for t in self.reader.tensors:
            if t.tensor_type not in LOADABLE:
                names = ", ".join(sorted(q.name for q in LOADABLE))
                raise CheckpointError(f"{self.path}: tensor '{t.name}' has type {t.tensor_type.name}, which deltaserve "
                                      f"cannot dequantize (supported: {names})")
        self.arch = self.get("general.architecture", str)

    def get(self, key: str, kind: type, default: Any = _MISSING) -> Any:
        """Metadata value of `key`, checked to be a `kind` (int, float, str, bool or list)."""
        field = self.reader.get_field(key)
        if field is None:
            if default is _MISSING:
                raise CheckpointError(f"{self.path}: metadata key '{key}' is missing")
            return default
        try:
            value = field.contents()
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: metadata key '{key}' holds invalid UTF-8") from None
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise CheckpointError(f"{self.path}: metadata key '{key}' should be {kind.__name__}, "
                                  f"found {type(value).__name__} {str(value)[:60]!r}")
        return value

    def shape(self, name: str) -> tuple[int, ...]:
        """PyTorch-order shape (GGUF stores `ne`, innermost first)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape))

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def data_bytes(self, name: str) -> int:
        return int(self.tensors[name].n_bytes)

    def read(self, name: str) -> torch.Tensor:
        """The tensor dequantized to a fresh float32 tensor (the file stays untouched)."""
        t = self.tensors[name]
        with np.errstate(invalid="ignore", over="ignore"):  # corrupt scales surface as non-finite values below
            arr = dequantize(t.data, t.tensor_type)
        arr = np.array(arr, dtype=np.float32, copy=True if t.tensor_type == Q.F32 else None)  # F32: a view of the map
        if not np.isfinite(arr).all():
            raise CheckpointError(f"{self.path}: tensor '{name}' ({t.tensor_type.name}) holds NaN or Inf values "
                                  f"after dequantization (corrupt data?)")
        return torch.from_numpy(arr).reshape(self.shape(name))
