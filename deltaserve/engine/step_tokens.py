"""The token ids of a launched decode step, read by the host only when it needs them.

A launched step's tokens stay on the device, where the next step can take them as its input ids
with no host round trip, while a copy travels to pinned host memory; `tolist` waits for that copy
only. The engine uses this to start step N+1 before it reads step N's tokens (overlap_decode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepTokens:
    device: torch.Tensor  # [n] int64; may be a CUDA graph's static buffer: valid as input to the next launch only
    host: torch.Tensor  # [n] int64, pinned for CUDA; holds the ids once `ready` has passed
    ready: torch.cuda.Event | None  # None: `host` is already filled (CPU)

    @classmethod
    def of(cls, tokens: torch.Tensor) -> "StepTokens":
        """Starts the device-to-host copy of tokens ([n] int64) on the current stream."""
        if tokens.device.type != "cuda":
            return cls(tokens, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(tokens, host, ready)

    def tolist(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()
