"""Reads a Hugging Face checkpoint directory: one `model.safetensors` or shards listed in an index.

Names are normalised to the text-only layout: a *ForConditionalGeneration checkpoint's
`model.language_model.*` becomes `model.*`; its vision tower (`model.visual.*`) is skipped.
Tensors are read lazily (memory-mapped by safetensors), one at a time. In a block-FP8 checkpoint (weights/fp8.py)
each quantized weight's `<name>_scale_inv` sibling is not a tensor of its own: `get` dequantizes the pair to float32,
`get_fp8` hands it over as stored.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from .fp8 import Fp8FormatError, Fp8Part, check_quantization, dequantize_fp8


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
        self._scales: dict[str, str] = {}  # FP8 weight -> its scale_inv sibling (both normalised names)
        self._scale_where: dict[str, tuple[str, str]] = {}
        self.file_bytes = 0  # the tensors' bytes as stored
        cfg_file = self.path / "config.json"
        try:
            fp8 = cfg_file.is_file() and check_quantization(json.loads(cfg_file.read_text()), str(cfg_file))
        except (Fp8FormatError, json.JSONDecodeError) as e:
            raise CheckpointError(str(e)) from None
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
                    if info.get_dtype().startswith("F8") and not fp8:
                        raise CheckpointError(f"{fpath}: tensor '{raw}' is FP8 but config.json has no fp8 "
                                              "quantization_config")
        for name in [n for n in self._where if n.endswith("_scale_inv")]:
            weight = name.removesuffix("_scale_inv")
            if weight not in self._where:
                raise CheckpointError(f"{self.path}: '{name}' scales a tensor '{weight}' that is not there")
            self._scales[weight] = name
            self._scale_where[name] = self._where.pop(name)

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def get_stored(self, name: str) -> torch.Tensor:
        """The tensor in the dtype the file stores it in; an FP8 weight dequantized to float32 (as get)."""
        return self.get(name)

    def get_fp8(self, name: str) -> Fp8Part | None:
        """(codes float8_e4m3fn [N, K], scale_inv [ceil(N/128), ceil(K/128)]) of an FP8 weight, else None."""
        if name not in self._scales:
            return None
        codes, scale = self._read(name), self._read(self._scales[name])
        n, k = codes.shape
        if codes.dtype != torch.float8_e4m3fn or scale.shape != (-(-n // 128), -(-k // 128)):
            raise CheckpointError(f"{self.path}: FP8 weight '{name}' ({codes.dtype}) has scales of shape "
                                  f"{list(scale.shape)}, expected float8_e4m3fn codes and [{-(-n // 128)}, "
                                  f"{-(-k // 128)}] scales")
        return codes, scale

    def reads_rows(self, name: str) -> bool:
        """Whether get_rows serves name (plain tensors; FP8 blocks are read whole)."""
        return name not in self._scales

    def get_rows(self, name: str, rows: torch.Tensor, cols: slice) -> torch.Tensor:
        """Rows `rows` (ascending, numbered over the leading dims) of tensor name, columns cols: [len(rows), C],
        read run by run of consecutive rows (only those bytes leave the file)."""
        fname, raw = self._where[name]
        view = self._handles[fname].get_slice(raw)
        per = self._shape[name][-2] if len(self._shape[name]) == 3 else None  # rows per leading index
        out, rows = [], rows.tolist()
        i = 0
        while i < len(rows):
            j = i
            while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1 and (per is None or rows[j + 1] % per):
                j += 1
            a, b = rows[i], rows[j] + 1
            if per is None:
                out.append(view[a:b, cols])
            else:  # a run inside one leading index (runs break where it changes)
                out.append(view[a // per:a // per + 1, a % per:(b - 1) % per + 1, cols][0])
            i = j + 1
        return torch.cat(out)

    def get(self, name: str) -> torch.Tensor:
        fp8 = self.get_fp8(name)
        return self._read(name) if fp8 is None else dequantize_fp8(*fp8)

    def _read(self, name: str) -> torch.Tensor:
        fname, raw = self._where.get(name) or self._scale_where[name]
        try:
            return self._handles[fname].get_tensor(raw)
        except Exception as e:
            raise CheckpointError(f"{self.path / fname}: cannot read tensor '{raw}' ({e})") from None

