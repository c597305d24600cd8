"""Torch reference kernels (CPU, and the oracle for GPU kernels).

Letters: T = tokens, B = segments in a group, L = padded segment length, S = pool slots,
C = conv channels, K = conv width, H = heads (V heads for the delta rule), Dk/Dv = head dims.

Every kernel reads each segment's initial state from its slot (zero when the segment resets)
and writes the final state back to that slot. With one sequence in the batch the slot is used
through a view of the pool, so nothing is gathered or scattered. Multi-token paths compute
out of place and write states back detached, so the same code trains under autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..forward_batch import CHUNK, ForwardBatch


# ---------------------------------------------------------------- causal conv ----

def conv_index(batch: ForwardBatch, kernel: int) -> tuple[torch.Tensor, ...]:
    """Gather indices for a causal conv of width K over all segments at once (once per batch).

    The conv input of segment s is its K-1 window rows followed by its tokens. Windows of all
    segments are stacked first ([N*(K-1), C]), then the batch's tokens ([T, C]).
    Returns tap_index [T, K] (rows feeding each output), window_index [N, K-1] (rows that form each
    segment's next window), and the snapshot slots [P] and rows [P, K-1] of the window after each
    snapshotted token (speculative verify).
    """
    key = ("conv", kernel)
    if key not in batch.derived:
        w = kernel - 1
        n = batch.num_segments
        dev = batch.cu_seqlens.device
        t = torch.arange(len(batch.positions), device=dev)
        local = t - batch.cu_seqlens[batch.token_segment]  # [T]
        p = local[:, None] + torch.arange(kernel, device=dev)  # [T, K] position in the segment's input
        seg = batch.token_segment[:, None]
        taps = torch.where(p < w, seg * w + p, n * w + t[:, None] + p - local[:, None] - w)
        lens = torch.tensor(batch.lens, device=dev)
        q = lens[:, None] + torch.arange(w, device=dev)  # [N, K-1]
        s = torch.arange(n, device=dev)[:, None]
        window = torch.where(q < w, s * w + q, n * w + batch.cu_seqlens[:-1, None] + q - w)
        batch.derived[key] = (taps, window, *_snapshot_windows(batch, w))
    return batch.derived[key]


def _snapshot_windows(batch: ForwardBatch, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots [P] and gather rows [P, K-1] of the window after each snapshotted token."""
    slots, rows = [], []
    n, first = batch.num_segments, 0
    for grp in batch.groups:
        if grp.kind == "verify":
            for b, seg_slots in enumerate(grp.snapshot_slots.tolist()):
                seg, start = first + b, int(batch.cu_seqlens[first + b])
                for j, slot in enumerate(seg_slots):
                    if slot >= 0:  # window after token j: positions j+1 .. j+K-1 of the segment's input
                        q = [j + 1 + i for i in range(w)]
                        rows.append([seg * w + p if p < w else n * w + start + p - w for p in q])
                        slots.append(slot)
        first += len(grp.lens)
    dev = batch.cu_seqlens.device
    return (torch.tensor(slots, dtype=torch.long, device=dev),
            torch.tensor(rows, dtype=torch.long, device=dev).view(-1, w))


def causal_conv(x: torch.Tensor, weight: torch.Tensor, pool: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
    """Depthwise causal conv + SiLU over every segment, continuing each slot's window.

    x [T, C], weight [C, K], pool [S, K-1, C] (updated in place). Returns [T, C].
    """
    w = weight.shape[1] - 1
    slot = batch.single_slot
    if slot is not None:
        window = pool[slot]  # [K-1, C] view
        if batch.start_pos[0] == 0:
            window.zero_()
        ext = torch.cat([window, x])  # [K-1+T, C]
        t = x.shape[0]
        taps = weight.t().contiguous()  # [K, C]: a contiguous row per tap (a strided column multiplies ~4x slower)
        out = ext[:t] * taps[0]  # sum of K shifted slices: far faster on CPU than F.conv1d here
        for j in range(1, w + 1):
            out = out + ext[j:j + t] * taps[j]
        window.copy_(ext[-w:].detach())
        return F.silu(out)
    init = pool[batch.slots] * ~batch.reset[:, None, None]  # [N, K-1, C]
    ext = torch.cat([init.reshape(-1, x.shape[1]), x])  # [N*(K-1) + T, C]
    taps, windows, snap_slots, snap_rows = conv_index(batch, weight.shape[1])
    out = torch.einsum("tkc,ck->tc", ext[taps], weight)
    pool.index_copy_(0, batch.slots, ext[windows].detach())
    if batch.snapshots:  # speculative verify: the window after every token, one slot each
        pool.index_copy_(0, snap_slots, ext[snap_rows].detach())
    return F.silu(out)


# ------------------------------------------------------------ gated delta rule ----

def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    pool: torch.Tensor, batch: ForwardBatch,
) -> torch.Tensor:
    """Gated delta rule over all segments, states read from and written to their slots.

    q, k [T, Hk, Dk]; v [T, H, Dv]; g (log decay <= 0), beta [T, H]; pool [S, H, Dk, Dv] float32.
    q and k are L2-normalised here and q scaled by 1/sqrt(Dk). Returns [T, H, Dv] float32.
    """
    rep = v.shape[1] // k.shape[1]  # V heads served by each QK head
    q = l2norm(q.float()).repeat_interleave(rep, dim=1) * q.shape[-1] ** -0.5
    k = l2norm(k.float()).repeat_interleave(rep, dim=1)
    v, g, beta = v.float(), g.float(), beta.float()
    out = torch.empty_like(v)  # filled group by group; out-of-place parts keep autograd history
    slot = batch.single_slot
    for grp in batch.groups:
        rows = grp.tokens
        if slot is not None:
            state = pool[slot: slot + 1]  # [1, H, Dk, Dv] view of the slot
            if batch.start_pos[0] == 0:
                state.zero_()
                if grp.kind == "prefill":  # a fresh start reads no state (keeps autograd off the pool)
                    state = torch.zeros_like(state)
        else:
            state = pool[grp.slots] * ~grp.reset[:, None, None, None]  # gathered copy
        if grp.kind == "decode":  # one token per segment, state updated in place
            out[rows] = recurrent_step(q[rows], k[rows], v[rows], g[rows], beta[rows], state)
            final = state
        elif grp.kind == "verify":  # a few draft tokens: step by step, keeping the state after each
            out[rows] = grp.from_padded(verify_steps(*[grp.to_padded(t[rows]) for t in (q, k, v, g, beta)],
                                                     state, pool, grp.snapshot_slots))
            final = state
        else:
            padded = [grp.to_padded(t[rows]) for t in (q, k, v, g, beta)]
            o, final = chunked(*padded, state)
            out[rows] = grp.from_padded(o)
        if slot is not None:
            if final is not state:
                pool[slot].copy_(final[0].detach())
        else:
            pool.index_copy_(0, grp.slots, final.detach())
    return out


def recurrent_step(q, k, v, g, beta, state):
    """One token per sequence. q, k [B, H, Dk]; v [B, H, Dv]; g, beta [B, H]; state [B, H, Dk, Dv] in place."""
    state.mul_(g.exp()[..., None, None])
    predicted = torch.einsum("bhk,bhkv->bhv", k, state)
    update = (v - predicted) * beta[..., None]  # the delta: what the state mispredicts, scaled by beta
    state.add_(k[..., :, None] * update[..., None, :])
    return torch.einsum("bhk,bhkv->bhv", q, state)


def verify_steps(q, k, v, g, beta, state, pool, snapshot_slots):
    """Recurrent steps over padded verify segments ([B, L, ...]); after token j, each segment's state
    is copied to snapshot_slots[:, j] (-1: none). Padding (g = beta = 0) leaves a state unchanged.
    state [B, H, Dk, Dv] is updated in place to the state after the last token."""
    outs = []
    for j in range(q.shape[1]):  # L <= 1 + draft tokens: a handful
        outs.append(recurrent_step(q[:, j], k[:, j], v[:, j], g[:, j], beta[:, j], state))
        if j < snapshot_slots.shape[1]:
            keep = snapshot_slots[:, j] >= 0
            pool.index_copy_(0, snapshot_slots[keep, j], state[keep])
    return torch.stack(outs, dim=1)


def chunked(q, k, v, g, beta, state, chunk: int = CHUNK):
    """Chunked (WY) form over padded segments; padding has g = beta = 0 and so leaves the state alone.

    q, k [B, L, H, Dk]; v [B, L, H, Dv]; g, beta [B, L, H]; state [B, H, Dk, Dv].
    Returns (out [B, L, H, Dv], final state [B, H, Dk, Dv]).
    Within a chunk with start state S and cumulative log decay G_i:
      u = T (beta v) - T (beta e^G k) S,  T = (I + A)^-1,  A_ij = beta_i e^(G_i-G_j) k_i.k_j  (j < i)
      o = (e^G q) S + [e^(G_i-G_j) q_i.k_j]_(j<=i) u
      S' = e^(G_last) S + (e^(G_last-G) k)^T u
    Everything but the last two lines' use of S is computed for all chunks at once.
    """
    b, length, h, dk = k.shape
    pad = -length % chunk
    q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
    g, beta = (F.pad(t, (0, 0, 0, pad)) for t in (g, beta))
    n = (length + pad) // chunk
    # -> [B, H, n, C, D] and [B, H, n, C]
    q, k, v = (t.transpose(1, 2).reshape(b, h, n, chunk, -1) for t in (q, k, v))
    g, beta = (t.transpose(1, 2).reshape(b, h, n, chunk) for t in (g, beta))

    cum = g.cumsum(-1)  # G
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    rel = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # e^(G_i-G_j), j<=i
    kk, qk = (torch.cat([k, q], dim=-2) @ k.transpose(-1, -2)).split(chunk, dim=-2)  # one copy of k^T
    a = (beta[..., None] * kk * rel).tril(-1)
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device)
    t = torch.linalg.solve_triangular(eye + a, eye.expand_as(a), upper=False, unitriangular=True)  # T, [.., C, C]
    t_v, t_k = t @ (beta[..., None] * v), t @ ((beta * cum.exp())[..., None] * k)
    q_decay = q * cum.exp()[..., None]
    qk = qk * rel
    k_tail = k * (cum[..., -1:] - cum).exp()[..., None]
    tail = cum[..., -1].exp()[..., None, None]  # [B, H, n, 1, 1]

    outs = []
    for c in range(n):  # sequential over chunks only
        u = t_v[:, :, c] - t_k[:, :, c] @ state
        outs.append(q_decay[:, :, c] @ state + qk[:, :, c] @ u)
        state = state * tail[:, :, c] + k_tail[:, :, c].transpose(-1, -2) @ u
    out = torch.stack(outs, dim=2).reshape(b, h, n * chunk, -1)[:, :, :length].transpose(1, 2)
    return out, state


# ------------------------------------------------------------------ attention ----

def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch, scale: float, block_table: torch.Tensor,
) -> torch.Tensor:
    """Causal attention of each segment over its slot's KV blocks, after appending its own keys.

    q [T, H, D]; k, v [T, G, D]; caches [NB, BS, G, D] (blocks of BS positions); block_table [S, MB]: block j of
    slot s holds its positions j*BS .. j*BS + BS - 1. Returns [T, H, D].
    """
    bs = k_cache.shape[1]
    k_flat, v_flat = k_cache.flatten(0, 1), v_cache.flatten(0, 1)  # [NB*BS, G, D]
    rows = block_table[batch.token_slots, batch.positions // bs].long() * bs + batch.positions % bs  # [T]
    k_flat[rows] = k.to(k_cache.dtype)
    v_flat[rows] = v.to(v_cache.dtype)
    out = torch.empty_like(q)
    for grp in batch.groups:
        ends = grp.start_pos + grp.lens  # [B]
        width = int(ends.max())
        key_rows = _key_rows(block_table[grp.slots], width, bs)  # [B, width]
        q_pos = grp.start_pos[:, None] + torch.arange(grp.pad_index.shape[1], device=q.device)  # [B, L]
        q_pos = torch.where(grp.valid, q_pos, 0)  # padding rows look at key 0 only (no empty softmax)
        attended = _sdpa(grp.to_padded(q[grp.tokens]), k_flat[key_rows], v_flat[key_rows], _causal_mask(q_pos, width),
                         scale)
        out[grp.tokens] = grp.from_padded(attended)
    return out


def _key_rows(tables: torch.Tensor, width: int, bs: int) -> torch.Tensor:
    """[B, MB] block tables -> [B, width] rows of the flattened cache holding positions 0 .. width - 1."""
    j = torch.arange(width, device=tables.device)
    return tables[:, j // bs].long() * bs + j % bs


def _causal_mask(q_pos: torch.Tensor, width: int) -> torch.Tensor:
    """[B, L] query positions -> [B, 1, L, width] bool, key j visible when j <= position."""
    return (torch.arange(width, device=q_pos.device) <= q_pos[..., None])[:, None]


def _sdpa(q, k, v, mask, scale):
    """q [B, L, H, D], k/v [B, W, Hkv, D] -> [B, L, H, D]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
        attn_mask=mask, scale=scale, enable_gqa=True,
    )
    return out.transpose(1, 2)
