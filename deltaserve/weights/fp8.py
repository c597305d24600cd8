"""Qwen's block-FP8 checkpoints (`quantization_config.quant_method == "fp8"`): read, fuse, and write.

A quantized matrix W [N, K] is stored as float8_e4m3fn codes plus `<name>_scale_inv` float32 (or bf16)
[ceil(N/128), ceil(K/128)]: despite its name a multiplier, w = code * scale_inv[n // 128, k // 128]. Which
modules stay bf16 is the config's `modules_to_not_convert` (a tensor without a scale sibling is plain).
On the GPU the codes stay FP8 (`combine_fp8` -> PlanarWeight); elsewhere they are dequantized at load.
`write_fp8_checkpoint` makes such a checkpoint from a float one (tests, benchmarks).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..kernels.gpu_quant import FP8_BLOCK, PlanarSegment, PlanarWeight

Fp8Part = tuple[torch.Tensor, torch.Tensor]  # (codes [..., N, K] float8_e4m3fn, scale_inv [..., N/128, K/128])
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# what Qwen's FP8 releases leave in bf16 (a module name ends with one of these), written to the config
NOT_CONVERTED = ["lm_head", "embed_tokens", "mlp.gate", "shared_expert_gate", "conv1d", "in_proj_a", "in_proj_b",
                 "in_proj_ba", "mtp.fc"]


class Fp8FormatError(ValueError):
    pass


def check_quantization(cfg: dict, where: str) -> bool:
    """True for a block-FP8 config; False for none; Fp8FormatError for anything else deltaserve cannot read."""
    q = cfg.get("quantization_config") or cfg.get("text_config", {}).get("quantization_config")
    if not q:
        return False
    if q.get("quant_method") != "fp8":
        raise Fp8FormatError(f"{where}: quantization method {q.get('quant_method')!r} is not supported (only 'fp8')")
    if q.get("fmt", "e4m3") != "e4m3" or list(q.get("weight_block_size") or []) != [FP8_BLOCK, FP8_BLOCK]:
        raise Fp8FormatError(f"{where}: fp8 needs fmt 'e4m3' and weight_block_size [128, 128]; got "
                             f"{q.get('fmt')!r}, {q.get('weight_block_size')!r}")
    return True


def expand_scales(scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """[..., ceil(N/128), ceil(K/128)] block scales -> float32 [..., N, ceil(K/128)]: one row per weight row."""
    return scale.float().repeat_interleave(FP8_BLOCK, -2)[..., :n, :]


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = codes.shape[-2:]
    return codes.float() * expand_scales(scale, n, k).repeat_interleave(FP8_BLOCK, -1)[..., :k]


def combine_fp8(build: Callable[[list], torch.Tensor], parts: list[Fp8Part | torch.Tensor],
                dtype: torch.dtype) -> PlanarWeight:
    """build(parts) (a fusion that only moves whole rows, see weights/rows.py) on FP8 parts and plain ones (rows
    the file keeps in bf16, e.g. Qwen3-Next's in_proj_ba beside in_proj_qkvz): one segment per run of rows of
    one kind. An FP8 run keeps the file's 128-row scale blocks where every block of its rows shares one scale
    row, else a scale row per weight row."""
    k = parts[0][0].shape[-1] if isinstance(parts[0], tuple) else parts[0].shape[-1]
    ids, tables, kind_of, pos_of, offset = [], {"fp8": [], "scale": [], "plain": []}, [], [], 0
    for part in parts:
        fp8 = isinstance(part, tuple)
        shape = part[0].shape if fp8 else part.shape
        count = shape[:-1].numel()
        ids.append(torch.arange(offset, offset + count).view(*shape[:-1], 1))
        start = sum(t.shape[0] for t in tables["fp8" if fp8 else "plain"])
        if fp8:
            tables["fp8"].append(part[0].reshape(-1, k).view(torch.uint8))
            tables["scale"].append(expand_scales(part[1], shape[-2], k).reshape(count, -1))
        else:
            tables["plain"].append(part.reshape(-1, k).to(dtype))
        kind_of.append(torch.full((count,), int(fp8)))
        pos_of.append(start + torch.arange(count))
        offset += count
    order = build(ids)[..., 0]  # [..., N] global row numbers in the output's order
    flat = order.reshape(-1, order.shape[-1])  # [L, N]
    kind = torch.cat(kind_of)[flat]
    if not torch.equal(kind, kind[:1].expand_as(kind)):
        raise ValueError("experts of one stack would mix FP8 and plain rows")
    pos, tables = torch.cat(pos_of), {name: torch.cat(t) for name, t in tables.items() if t}
    segments, n0 = [], 0
    for fp8, count in zip(*(r.tolist() for r in torch.unique_consecutive(kind[0], return_counts=True))):
        rows = pos[flat[:, n0:n0 + count]]  # [L, count]
        lead = (*order.shape[:-1], count)
        if not fp8:
            segments.append(PlanarSegment("plain", tables["plain"][rows].reshape(*lead, k)))
        else:
            scale = tables["scale"][rows].reshape(*lead, -1)
            blocks = scale.unflatten(-2, (-1, FP8_BLOCK)) if count % FP8_BLOCK == 0 else None
            shared = blocks is not None and torch.equal(blocks, blocks[..., :1, :].expand_as(blocks))
            segments.append(PlanarSegment("fp8", tables["fp8"][rows].view(torch.float8_e4m3fn).reshape(*lead, k),
                                          s=blocks[..., 0, :].contiguous() if shared else scale,
                                          row_block=FP8_BLOCK if shared else 1))
        n0 += count
    return PlanarWeight((*order.shape, k), segments, dtype=dtype)


def quantize_fp8(w: torch.Tensor) -> Fp8Part:
    """float [..., N, K] -> (codes, scale_inv [..., ceil(N/128), ceil(K/128)]), one scale per 128 x 128 block:
    amax / 448 (as Qwen's releases); on w's device."""
    n, k = w.shape[-2:]
    pad = F.pad(w.float(), (0, -k % FP8_BLOCK, 0, -n % FP8_BLOCK))
    blocks = pad.unflatten(-2, (-1, FP8_BLOCK)).unflatten(-1, (-1, FP8_BLOCK))  # [..., N/128, 128, K/128, 128]
    scale = blocks.abs().amax(dim=(-3, -1)).clamp_min(1e-12) / FP8_MAX  # [..., N/128, K/128]
    codes = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes.flatten(-2).flatten(-3, -2)[..., :n, :k].contiguous(), scale


def _converted(name: str, tensor: torch.Tensor, keep: list[str]) -> bool:
    module = name.removesuffix(".weight")
    return (name.endswith(".weight") and tensor.dim() == 2 and "norm" not in module
            and not any(module == k or module.endswith("." + k) for k in keep))


def write_fp8_checkpoint(src: str | Path, dst: str | Path, not_converted: list[str] | None = None) -> Path:
    """A block-FP8 copy of the float checkpoint directory src (config, tokenizer files and all): every 2-D weight
    of a module not named in `not_converted` (default: NOT_CONVERTED) becomes codes + `weight_scale_inv`."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    keep = list(NOT_CONVERTED if not_converted is None else not_converted)
    out = {}
    for name, tensor in load_file(str(src / "model.safetensors")).items():
        if _converted(name, tensor, keep):
            out[name], out[name + "_scale_inv"] = quantize_fp8(tensor)
        else:
            out[name] = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [FP8_BLOCK, FP8_BLOCK], "modules_to_not_convert": keep}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, dst / f.name)
    return dst
