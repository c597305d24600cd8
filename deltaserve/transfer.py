"""Host tensors to a device in one non-blocking copy (a copy per tensor from pageable memory waits for the device
each time, which stalls a step launched behind the running one)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def packed(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """The tensors' bytes as one uint8 tensor, each starting on a 16-byte boundary (Triton specialises kernels on
    pointer alignment: unaligned views would compile other variants), and where each starts."""
    parts, starts, start = [], [], 0
    for t in tensors:
        b = t.contiguous().reshape(-1).view(torch.uint8)
        parts.append(F.pad(b, (0, -b.numel() % 16)))
        starts.append(start)
        start += parts[-1].numel()
    return torch.cat(parts), starts


def unpacked(flat: torch.Tensor, starts: list[int], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of `packed`'s result (wherever it now lives) in each original tensor's dtype and shape."""
    return [flat[s:s + t.numel() * t.element_size()].view(t.dtype).view(t.shape) for s, t in zip(starts, like)]


def on_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host tensors on device in one non-blocking copy from pinned memory, as views of it (a copy per tensor from
    pageable memory would wait for the device each time, stalling a step launched behind the running one)."""
    if device.type == "cpu":
        return tensors
    staged, starts = packed(tensors)
    return unpacked(staged.pin_memory().to(device, non_blocking=True), starts, tensors)
