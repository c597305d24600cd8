"""Rewrites a GGUF file with metadata keys or tensors removed, changed or added (broken files for the error tests, files
in a mix of block formats), and random blocks of any GGML type."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, GGUFWriter
from gguf import GGMLQuantizationType as Q


def rewrite_gguf(src: Path, dst: Path, drop_keys: tuple[str, ...] = (), set_keys: dict | None = None,
                 drop_tensors: tuple[str, ...] = (), add_tensors: dict | None = None,
                 retype: dict | None = None) -> Path:
    """Copies a GGUF file with metadata keys or tensors removed, changed or added (to make broken files), or
    stored in other formats (retype: {name: (bytes [rows, row bytes] as uint8, GGML type)})."""
    reader = GGUFReader(src)
    arch = reader.get_field("general.architecture").contents()
    writer = GGUFWriter(dst, (set_keys or {}).get("general.architecture", arch))
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in drop_keys or name == "general.architecture":
            continue
        if name in (set_keys or {}):
            continue
        sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    for name, value in (set_keys or {}).items():
        if name != "general.architecture":
            writer.add_key_value(name, value, GGUFValueType.get_type(value))
    for t in reader.tensors:
        if t.name in (retype or {}):
            data, qtype = retype[t.name]
            writer.add_tensor(t.name, data, raw_dtype=qtype)
        elif t.name not in drop_tensors:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)  # data: byte shape when quantized
    for name, array in (add_tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


SCALE_AT = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208], Q.Q3_K: [108],
            Q.Q2_K: [80, 82], Q.Q5_1: [0, 2], Q.IQ4_NL: [0], Q.IQ4_XS: [0], Q.MXFP4: []}


def random_blocks(qtype, shape, seed=0, scale=1e-3) -> np.ndarray:
    """Blocks with every quant and sub-scale bit random and finite fp16 scales of either sign (|d| within a factor
    of 10 of `scale`): uint8 [..., rows, row bytes] (every bit pattern a quantizer could write, and more)."""
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (*shape[:-1], shape[-1] // block, size), dtype=np.uint8)
    for at in SCALE_AT[qtype]:
        d = (rng.uniform(scale / 5, scale * 2, raw.shape[:-1]) * rng.choice([-1, 1], raw.shape[:-1])).astype(np.float16)
        raw[..., at:at + 2] = d[..., None].view(np.uint8)
    if qtype == Q.MXFP4:  # an E8M0 scale 2^(e - 128) within a factor of 4 of `scale`, times levels up to 12
        e = np.round(np.log2(scale / 8)) + 128
        raw[..., 0] = rng.integers(e - 2, e + 3, raw.shape[:-1])
    return raw.reshape(*shape[:-1], -1)
