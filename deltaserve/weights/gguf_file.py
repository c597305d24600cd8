"""One GGUF file: typed metadata look-ups, and each tensor either as stored (`read_stored`: blocks of the types
the CPU kernels compute on, float tensors in their dtype) or dequantized to float32 (`read`).

Everything that can be checked before reading tensor data is checked when the file is opened
(magic, header, tensor types, every tensor's byte range against the file size), so a truncated or
corrupt file fails at once with the tensor or key named, never deep inside the model. Tensor data is read
with plain reads, one tensor at a time (gguf_header.py parses the header).
"""

from __future__ import annotations

import logging
import struct
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from ..kernels.quantized import FLOAT_DTYPES, KEPT, QuantizedWeight, QuantSegment
from .gguf_header import GGUFHeader, HeaderError, TensorInfo
from .safetensors_dir import CheckpointError

log = logging.getLogger(__name__)

Q = GGMLQuantizationType
# Types the reader loads (quantize.KEPT as stored, the rest dequantized by gguf-py); any other names itself
LOADABLE = frozenset({
    Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
    Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ4_NL, Q.IQ4_XS,
    Q.TQ1_0, Q.TQ2_0, Q.MXFP4,
})
_MISSING = object()
# each block's fp16 scales: bytes that must hold finite numbers
SCALE_BYTES = {Q.Q8_0: [0, 1], Q.Q4_0: [0, 1], Q.Q2_K: [80, 81, 82, 83], Q.Q3_K: [108, 109],
               Q.Q4_K: [0, 1, 2, 3], Q.Q5_K: [0, 1, 2, 3], Q.Q6_K: [208, 209], Q.IQ4_NL: [0, 1], Q.IQ4_XS: [0, 1]}


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such GGUF file")
        try:
            self.header = GGUFHeader(self.path)
        except (HeaderError, struct.error, UnicodeDecodeError, OverflowError, MemoryError) as e:
            raise CheckpointError(f"{self.path}: not a readable GGUF file, truncated or corrupt header "
                                  f"({type(e).__name__}: {e})") from None
        self.tensors = {t.name: self._checked(t) for t in self.header.tensors}
        self.arch = self.get("general.architecture", str)
        self._warned: set[Q] = set()

    def _checked(self, t: TensorInfo) -> TensorInfo:
        """t, after checking its type and byte range: a broken file fails at open, naming the tensor."""
        try:
            qtype = Q(t.type_id)
        except ValueError:
            raise CheckpointError(f"{self.path}: tensor '{t.name}' has unknown GGML type id {t.type_id}") from None
        if qtype not in LOADABLE:
            names = ", ".join(sorted(q.name for q in LOADABLE))
            raise CheckpointError(f"{self.path}: tensor '{t.name}' has type {qtype.name}, which deltaserve "
                                  f"cannot dequantize (supported: {names})")
        block, type_size = GGML_QUANT_SIZES[qtype]
        if t.dims and t.dims[0] % block:
            raise CheckpointError(f"{self.path}: tensor '{t.name}': row length {t.dims[0]} is not a multiple of "
                                  f"the {qtype.name} block size {block}")
        end = self.header.data_start + t.offset + prod(t.dims) // block * type_size
        if end > self.header.file_size:
            raise CheckpointError(f"{self.path}: tensor '{t.name}' ({qtype.name}, shape {list(t.dims[::-1])}) needs "
                                  f"bytes up to {end}, but the file has only {self.header.file_size} bytes "
                                  f"(truncated file?)")
        return t

    def get(self, key: str, kind: type, default: Any = _MISSING) -> Any:
        """Metadata value of `key`, checked to be a `kind` (int, float, str, bool or list)."""
        try:
            value = self.header.get(key)
        except (HeaderError, UnicodeDecodeError):
            raise CheckpointError(f"{self.path}: metadata key '{key}' holds invalid UTF-8") from None
        if value is None:
            if default is _MISSING:
                raise CheckpointError(f"{self.path}: metadata key '{key}' is missing")
            return default
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise CheckpointError(f"{self.path}: metadata key '{key}' should be {kind.__name__}, "
                                  f"found {type(value).__name__} {str(value)[:60]!r}")
        return value

    def shape(self, name: str) -> tuple[int, ...]:
        """PyTorch-order shape (GGUF stores `ne`, innermost first)."""
        return tuple(reversed(self.tensors[name].dims))

    def qtype(self, name: str) -> GGMLQuantizationType:
        return Q(self.tensors[name].type_id)

    def type_name(self, name: str) -> str:
        return self.qtype(name).name

    def data_bytes(self, name: str) -> int:
        block, type_size = GGML_QUANT_SIZES[self.qtype(name)]
        return prod(self.tensors[name].dims) // block * type_size

    def _bytes(self, name: str) -> np.ndarray:
        """The tensor's bytes, read into fresh memory (not through a map: pages of a mapped file a process has
        touched count in its resident memory until unmapped)."""
        offset = self.header.data_start + self.tensors[name].offset
        return np.fromfile(self.path, dtype=np.uint8, count=self.data_bytes(name), offset=offset)

    def _corrupt(self, name: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: tensor '{name}' ({self.type_name(name)}) holds NaN or Inf values "
                               f"(corrupt data?)")

    def read(self, name: str) -> torch.Tensor:
        """The tensor dequantized to a fresh float32 tensor."""
        qtype, raw = self.qtype(name), self._bytes(name)
        with np.errstate(invalid="ignore", over="ignore"):  # corrupt scales surface as non-finite values below
            arr = raw.view(np.float32) if qtype == Q.F32 else np.asarray(dequantize(raw, qtype), dtype=np.float32)
        if not np.isfinite(arr).all():
            raise self._corrupt(name)
        return torch.from_numpy(np.ascontiguousarray(arr)).reshape(self.shape(name))

    def read_stored(self, name: str) -> torch.Tensor | QuantizedWeight:
        """The tensor as the file stores it: float types as tensors of their dtype, the block types of
        quantized.KEPT as a QuantizedWeight; other types dequantized to float32 (logged once per type)."""
        qtype, shape = self.qtype(name), self.shape(name)
        if qtype not in KEPT:
            if qtype not in self._warned:
                self._warned.add(qtype)
                log.warning("%s: %s tensors are dequantized to float32 at load (no CPU kernel computes on "
                            "them as stored)", self.path.name, qtype.name)
            return self.read(name)
        data = torch.from_numpy(self._bytes(name))
        if qtype in FLOAT_DTYPES:
            tensor = data.view(FLOAT_DTYPES[qtype]).reshape(shape)
            if not torch.isfinite(tensor).all():
                raise self._corrupt(name)
            return tensor
        data = data.view(*shape[:-1], -1)
        blocks = data.reshape(-1, GGML_QUANT_SIZES[qtype][1])
        if qtype == Q.MXFP4:  # an E8M0 scale byte: 255 is NaN (OCP MX spec)
            finite = bool((blocks[:, 0] != 255).all())
        else:
            finite = bool(torch.isfinite(blocks[:, SCALE_BYTES[qtype]].contiguous().view(torch.float16)).all())
        if not finite:
            raise self._corrupt(name)
        return QuantizedWeight(shape, [QuantSegment(qtype, data)])
