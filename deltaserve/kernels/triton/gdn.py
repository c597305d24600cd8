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

from ...forward_batch import CHUNK, ForwardBatch
from .chunk_inputs import chunk_inputs, initial_states, store_states
from .conv import causal_conv
from .recurrent import gdn_recurrent


def _snapshot_table(batch: ForwardBatch, num_segments: int) -> torch.Tensor | None:
    """[N_recurrent, W] snapshot slots per decode/verify segment (-1: none), or None without verifies."""
    if not batch.snapshots:
        return None
    rows = []
    for grp in batch.groups:
        if grp.kind == "decode":
            rows.append(grp.slots.new_full((len(grp.slots), 1), -1))
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
    n_rec = sum(len(g.slots) for g in batch.groups if g.kind != "prefill")  # a shape: no device sync
    snaps = _snapshot_table(batch, n_seg)
    x = causal_conv(mixed, conv_weight, conv_pool, batch.cu_seqlens, batch.slots, batch.reset, max(batch.lens), snaps,
                    batch.token_segment)
    if n_rec == n_seg:
        return gdn_recurrent(x, a, b, A_log, dt_bias, ssm_pool, batch.cu_seqlens, batch.slots, batch.reset,
                             num_k_heads, snaps)
    t0 = sum(batch.lens[:n_rec])
    prefill = chunked_by_slot(x[t0:], a[t0:], b[t0:], A_log, dt_bias, ssm_pool, batch.slots[n_rec:],
                              batch.reset[n_rec:], batch.chunk_meta(n_rec, CHUNK), num_k_heads, k_head_dim)
    if not n_rec:
        return prefill
    decode = gdn_recurrent(x[:t0], a[:t0], b[:t0], A_log, dt_bias, ssm_pool, batch.cu_seqlens[:n_rec + 1],
                           batch.slots[:n_rec], batch.reset[:n_rec], num_k_heads,
                           None if snaps is None else snaps[:n_rec])
    return torch.cat([decode, prefill])


def chunked_by_slot(x, a, b, A_log, dt_bias, pool, slots, reset, meta: tuple[torch.Tensor, torch.Tensor],
                    num_k_heads: int, dk: int):
    """fla's chunked gated delta rule over prefill segments: x [T, C] after the conv; a, b [T, H] raw gate inputs;
    meta = (cu_seqlens, chunk index) from ForwardBatch.chunk_meta. Calls fla below its autograd Function with the
    step's chunk index, so nothing here copies to or waits for the host; the decay gate is computed inside fla's
    chunk cumsum (g = -exp(A_log) * softplus(a + dt_bias), as the recurrent kernel does)."""
    from fla.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_fwd

    h, dv = pool.shape[1], pool.shape[3]
    q, k, v, a, beta = chunk_inputs(x, a, b, num_k_heads, dk, h, dv)  # q, k normed [1, T, Hk, Dk]; v [1, T, H, Dv]
    cu, index = meta
    _, o, _, ht, _, _ = chunk_gated_delta_rule_fwd(
        q, k, v, a, beta, scale=dk ** -0.5, initial_state=initial_states(pool, slots, reset), output_final_state=True,
        cu_seqlens=cu, chunk_indices=index, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias, chunk_size=CHUNK)
    store_states(pool, slots, ht)
    return o[0]
