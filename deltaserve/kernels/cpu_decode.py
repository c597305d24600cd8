"""Gated delta rule for decode-only batches on CPU, with fewer passes over the recurrent states (issue 9).

A decode step is bound by reading and writing the [B, H, Dk, Dv] float32 states (1 MiB per sequence and
layer here). The reference (`reference.recurrent_step`) makes about 14 passes over them for a batch
(gather, reset mask, decay, k.S, the k u^T temporary and its add, q.S, scatter); this makes 5 when the
slots are consecutive (decay in place, one product for q.S and k.S, one in-place rank-1 update) and 7
otherwise (decay folded into the gather, and the scatter). It uses
    S' = g S + k u^T,  u = beta (v - k.(g S)),  o = q.S' = q.(g S) + (q.k) u.
Each sequence's arithmetic is the same whichever others share the batch.

B = sequences, Hk/H = QK/V heads, Dk/Dv = head dims, S = pool slots.
"""

from __future__ import annotations

import torch

from .reference import l2norm


def gated_delta_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                       pool: torch.Tensor, slots: list[int], reset: list[bool]) -> torch.Tensor:
    """One token per sequence. q, k [B, Hk, Dk]; v [B, H, Dv]; g (log decay), beta [B, H]; pool
    [S, H, Dk, Dv] float32, row slots[b] read and updated (zero first where reset[b]). Returns [B, H, Dv] float32."""
    b, h, dk = v.shape[0], v.shape[1], q.shape[-1]
    rep = h // k.shape[1]
    q = (l2norm(q.float()) * dk ** -0.5).repeat_interleave(rep, dim=1)  # [B, H, Dk]
    k = l2norm(k.float()).repeat_interleave(rep, dim=1)
    decay = g.float().exp()  # [B, H]
    if any(reset):
        decay = decay * ~torch.tensor(reset)[:, None]
    first = slots[0]
    consecutive = slots == list(range(first, first + b))
    if consecutive:
        state = pool[first:first + b]  # [B, H, Dk, Dv] view, updated in place
        state.mul_(decay[..., None, None])
    else:
        state = pool[torch.tensor(slots)] * decay[..., None, None]  # gathered and decayed in one pass
    proj = torch.matmul(torch.stack([q, k], dim=2), state)  # [B, H, 2, Dv]: q.(gS), k.(gS)
    u = (v.float() - proj[:, :, 1]) * beta.float()[..., None]  # [B, H, Dv]
    state.view(b * h, dk, -1).baddbmm_(k.reshape(b * h, dk, 1), u.reshape(b * h, 1, -1))
    if not consecutive:
        pool.index_copy_(0, torch.tensor(slots), state)
    return proj[:, :, 0] + (q * k).sum(-1, keepdim=True) * u
