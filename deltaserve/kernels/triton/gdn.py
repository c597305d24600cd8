"""A Gated DeltaNet layer's state work on CUDA: conv window, gating and delta rule, all by slot.

Letters: T = tokens, N = segments, C = conv channels, Hk/H = QK/V heads, Dk/Dv = head dims, S = pool slots.
Segments come decodes first, then speculative verifies, then prefill chunks (forward_batch.py):
- decode + verify segments: one launch of the fused recurrent kernel, states updated in place;
- prefill segments: one launch of fla's chunked kernel over all of them with cu_seqlens, initial
  states read from their slots (zero on reset) and final states written back to them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...forward_batch import ForwardBatch
from .conv import causal_conv
from .recurrent import gdn_recurrent


def _snapshot_table(batch: ForwardBatch, num_segments: int) -> torch.Tensor | None:
    """[N_recurrent, W] snapshot slots per decode/verify segment (-1: none), or None without verifies."""
    if not batch.snapshots:
        return None
    rows = []
    for grp in batch.groups:
        if grp.kind == "decode":
            rows.append(grp.slots.new_full((len(grp.lens), 1), -1))
        elif grp.kind == "verify":
            rows.append(grp.snapshot_slots)
    width = max(r.shape[1] for r in rows)
    table = torch.cat([F.pad(r, (0, width - r.shape[1]), value=-1) for r in rows])
    return F.pad(table, (0, 0, 0, num_segments - table.shape[0]), value=-1)


def gated_delta_net(mixed: torch.Tensor, a: torch.Tensor, b: torch.Tensor, conv_weight: torch.Tensor,
                    A_log: torch.Tensor, dt_bias: torch.Tensor, conv_pool: torch.Tensor, ssm_pool: torch.Tensor,
                    batch: ForwardBatch, num_k_heads: int, k_head_dim: int) -> torch.Tensor:
    """mixed [T, C] pre-conv q|k|v; a, b [T, H] raw gate inputs; conv_weight [C, K]; A_log, dt_bias [H];
    conv_pool [S, K-1, C]; ssm_pool [S, H, Dk, Dv] float32. Returns [T, H, Dv] in mixed's dtype."""
    n_seg = len(batch.lens)
    n_rec = sum(len(g.lens) for g in batch.groups if g.kind != "prefill")  # host metadata: no device sync
    snaps = _snapshot_table(batch, n_seg)
    x = causal_conv(mixed, conv_weight, conv_pool, batch.cu_seqlens, batch.slots, batch.reset, max(batch.lens), snaps)
    if n_rec == n_seg:
        return gdn_recurrent(x, a, b, A_log, dt_bias, ssm_pool, batch.cu_seqlens, batch.slots, batch.reset,
                             num_k_heads, snaps)
    h, dv = ssm_pool.shape[1], ssm_pool.shape[3]
    out = torch.empty(x.shape[0], h, dv, dtype=x.dtype, device=x.device)
    t0 = sum(batch.lens[:n_rec])
    if n_rec:
        out[:t0] = gdn_recurrent(x[:t0], a[:t0], b[:t0], A_log, dt_bias, ssm_pool, batch.cu_seqlens[:n_rec + 1],
                                 batch.slots[:n_rec], batch.reset[:n_rec], num_k_heads,
                                 None if snaps is None else snaps[:n_rec])
    out[t0:] = chunked_by_slot(x[t0:], a[t0:], b[t0:], A_log, dt_bias, ssm_pool, batch.slots[n_rec:],
                               batch.reset[n_rec:], batch.lens[n_rec:], num_k_heads, k_head_dim)
    return out


def chunked_by_slot(x, a, b, A_log, dt_bias, pool, slots, reset, lens: list[int], num_k_heads: int, dk: int):
    """fla's chunked gated delta rule over prefill segments (x [T, C] after the conv, lens host ints)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    t, h, dv = x.shape[0], pool.shape[1], pool.shape[3]
    kd = num_k_heads * dk
    q, k, v = x.split([kd, kd, h * dv], dim=-1)
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())  # [T, H] log decay
    beta = b.float().sigmoid()
    cu_cpu = torch.tensor([0] + lens, dtype=torch.long).cumsum(0)
    h0 = pool[slots] * ~reset[:, None, None, None]  # [N, H, Dk, Dv] initial states, zero on reset
    o, ht = chunk_gated_delta_rule(
        q.reshape(1, t, num_k_heads, dk), k.reshape(1, t, num_k_heads, dk), v.reshape(1, t, h, dv),
        g[None], beta[None], scale=dk ** -0.5, initial_state=h0, output_final_state=True,
        use_qk_l2norm_in_kernel=True, cu_seqlens=cu_cpu.to(x.device, non_blocking=True), cu_seqlens_cpu=cu_cpu,
    )
    pool.index_copy_(0, slots, ht.float())
    return o[0]
