"""The GGUF header (format v2/v3, little-endian): metadata and tensor infos, parsed without touching tensor data.

Arrays are parsed when asked for: a vocabulary of 248k token strings becomes Python objects only when the
tokenizer is built, not whenever the file is opened (gguf-py's reader keeps a numpy view per string: ~65 MB
of objects for 32k tokens, several hundred MB for Qwen3.5's vocabulary).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

MAGIC = b"GGUF"
# GGUF value types: struct format of the scalars, numpy dtype of their arrays
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class HeaderError(ValueError):
    pass


class TensorInfo(NamedTuple):
    name: str
    type_id: int
    dims: tuple[int, ...]  # GGUF `ne` order: innermost first
    offset: int  # relative to the start of the data section


class _Array(NamedTuple):  # an array value not parsed yet
    item_type: int
    count: int
    offset: int  # of its first item in the header bytes


class GGUFHeader:
    def __init__(self, path: Path):
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise HeaderError("empty or truncated header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                if mm[:4] != MAGIC:
                    raise HeaderError(f"bad magic {bytes(mm[:4])!r}, expected {MAGIC!r}")
                self.file_size = size
                self._buf, self._pos = mm, 4
                self.version, n_tensors, n_kv = self._unpack("<IQQ")
                if self.version not in (2, 3):
                    raise HeaderError(f"GGUF version {self.version} is not supported (2 or 3; big-endian files are not)")
                self.fields: dict[str, Any] = {}
                for _ in range(n_kv):
                    key = self._string()
                    self.fields[key] = self._value(self._unpack("<I")[0])
                self.tensors = [self._tensor_info() for _ in range(n_tensors)]
                align = self.fields.get("general.alignment", 32)
                self.data_start = (self._pos + align - 1) // align * align
                self._header = bytes(mm[:self._pos])  # arrays are parsed from this copy on demand
        self._buf = self._header

    def get(self, key: str) -> Any:
        """The value of `key` (arrays as lists), or None when absent."""
        value = self.fields.get(key)
        if isinstance(value, _Array):
            self._pos = value.offset
            value = self._array_items(value.item_type, value.count)
        return value

    def _unpack(self, fmt: str) -> tuple:
        n = struct.calcsize(fmt)
        if self._pos + n > len(self._buf):
            raise HeaderError("truncated header")
        out = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += n
        return out

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        if self._pos + n > len(self._buf):
            raise HeaderError("truncated header (string past the end of the file)")
        raw = bytes(self._buf[self._pos:self._pos + n])
        self._pos += n
        return raw.decode("utf-8")

    def _value(self, vtype: int) -> Any:
        if vtype in SCALARS:
            return self._unpack(SCALARS[vtype])[0]
        if vtype == STRING:
            return self._string()
        if vtype == ARRAY:
            item_type, count = self._unpack("<IQ")
            array = _Array(item_type, count, self._pos)
            self._array_items(item_type, count, skip=True)
            return array
        raise HeaderError(f"unknown metadata value type {vtype}")

    def _array_items(self, item_type: int, count: int, skip: bool = False) -> list | None:
        if item_type in SCALARS:
            n = struct.calcsize(SCALARS[item_type]) * count
            if self._pos + n > len(self._buf):
                raise HeaderError("truncated header (array past the end of the file)")
            start, self._pos = self._pos, self._pos + n
            return None if skip else np.frombuffer(self._buf, SCALARS[item_type], count, start).tolist()
        items = [self._value(item_type) for _ in range(count)]
        return None if skip else [self.get_parsed(i) for i in items]

    def get_parsed(self, value: Any) -> Any:
        if isinstance(value, _Array):
            self._pos, pos = value.offset, self._pos
            out = self._array_items(value.item_type, value.count)
            self._pos = pos
            return out
        return value

    def _tensor_info(self) -> TensorInfo:
        name = self._string()
        (n_dims,) = self._unpack("<I")
        dims = self._unpack(f"<{n_dims}Q")
        type_id, offset = self._unpack("<IQ")
        return TensorInfo(name, type_id, tuple(dims), offset)
