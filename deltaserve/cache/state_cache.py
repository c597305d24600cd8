"""Per-sequence state: conv windows and fp32 delta-rule states per GDN layer, paged KV cache per attention layer.

S = slots, K = conv width, C = conv channels, H = V heads, Dk/Dv = head dims,
M = max_model_len, G = KV heads, D = head dim, NB = KV blocks, BS = positions per block, MB = blocks per slot.

Slots [0, max_num_seqs) belong to running sequences and have a block table row: position p of slot s lives in KV
block block_table[s, p // BS] (which blocks, engine/kv_manager.py decides). Slots past that are spare states
(`extra_state_slots`) with no KV: snapshots for benchmarks and prefix caching, and one state per draft position
for speculative decoding. Memory is sized up front.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..transfer import on_device


class CacheTooLarge(MemoryError):
    pass


@dataclass(frozen=True)
class CacheSize:
    conv_bytes: int
    state_bytes: int
    kv_bytes: int

    @property
    def total(self) -> int:
        return self.conv_bytes + self.state_bytes + self.kv_bytes

    def describe(self) -> str:
        mib = 2 ** 20
        return (f"state pool {(self.conv_bytes + self.state_bytes) / mib:.1f} MiB "
                f"(conv {self.conv_bytes / mib:.1f}, delta-rule {self.state_bytes / mib:.1f}), "
                f"KV cache {self.kv_bytes / mib:.1f} MiB, total {self.total / mib:.1f} MiB")


KV_BLOCK = 16  # positions per KV block


def kv_blocks_for(max_num_seqs: int, max_model_len: int) -> int:
    """The default pool: every slot can hold max_model_len positions at once."""
    return max_num_seqs * -(-max_model_len // KV_BLOCK)


def cache_size(cfg: ModelConfig, max_num_seqs: int, max_model_len: int, dtype: torch.dtype,
               extra_state_slots: int = 0, mtp_layers: int = 0, num_kv_blocks: int | None = None) -> CacheSize:
    slots = max_num_seqs + extra_state_slots
    blocks = kv_blocks_for(max_num_seqs, max_model_len) if num_kv_blocks is None else num_kv_blocks
    elem = torch.tensor([], dtype=dtype).element_size()
    n_gdn, n_attn = len(cfg.gdn_layers), len(cfg.attn_layers)
    conv = n_gdn * slots * (cfg.conv_kernel - 1) * cfg.conv_dim * elem
    state = n_gdn * slots * cfg.num_v_heads * cfg.k_head_dim * cfg.v_head_dim * 4
    kv = (n_attn + mtp_layers) * 2 * blocks * KV_BLOCK * cfg.num_kv_heads * cfg.head_dim * elem
    return CacheSize(conv, state, kv)


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


class HybridCache:
    def __init__(self, cfg: ModelConfig, max_num_seqs: int, max_model_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", extra_state_slots: int = 0, mtp_layers: int = 0,
                 num_kv_blocks: int | None = None):
        device = torch.device(device)
        self.num_kv_blocks = kv_blocks_for(max_num_seqs, max_model_len) if num_kv_blocks is None else num_kv_blocks
        self.size = cache_size(cfg, max_num_seqs, max_model_len, dtype, extra_state_slots, mtp_layers,
                               self.num_kv_blocks)
        free = available_memory(device)
        if self.size.total > 0.9 * free:
            raise CacheTooLarge(
                f"cache needs {self.size.describe()}, but only {free / 2**20:.0f} MiB are free on {device}: "
                "lower max_num_seqs, max_model_len or the KV cache size"
            )
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.num_slots = max_num_seqs + extra_state_slots
        s, w = self.num_slots, cfg.conv_kernel - 1
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i in cfg.gdn_layers:
            conv = torch.zeros(s, w, cfg.conv_dim, dtype=dtype, device=device)  # [S, K-1, C]
            ssm = torch.zeros(s, cfg.num_v_heads, cfg.k_head_dim, cfg.v_head_dim, dtype=torch.float32, device=device)
            self._layers[i] = (conv, ssm)
        shape = (self.num_kv_blocks, KV_BLOCK, cfg.num_kv_heads, cfg.head_dim)  # [NB, BS, G, D]
        for i in cfg.attn_layers:
            self._layers[i] = (torch.zeros(shape, dtype=dtype, device=device),
                               torch.zeros(shape, dtype=dtype, device=device))
        # the MTP head's own attention KV (speculative decoding), one per MTP layer
        self.mtp_kv = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                       for _ in range(mtp_layers)]
        self._gdn = [self._layers[i] for i in cfg.gdn_layers]
        self._kv = [self._layers[i] for i in cfg.attn_layers] + self.mtp_kv
        # [S, MB] int32: slot s's blocks (entries past its length are stale; kernels never read them). Until the
        # engine's KV manager assigns blocks: slot s owns blocks s*MB .. s*MB + MB - 1 where the pool has them
        mb = -(-max_model_len // KV_BLOCK)
        self.block_table = (torch.arange(max_num_seqs * mb, dtype=torch.int32) % max(self.num_kv_blocks, 1)).view(
            max_num_seqs, mb).to(device)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv pool, delta-rule pool) of a GDN layer, or (k cache, v cache) of an attention layer."""
        return self._layers[i]

    def set_blocks(self, entries: list[tuple[int, int, int]]) -> None:
        """Block table updates (slot, index, block), written in one copy."""
        if entries:
            slot, index, block = on_device([torch.tensor(entries).T.contiguous()], self.block_table.device)[0]
            self.block_table[slot, index] = block.to(torch.int32)

    def copy_blocks(self, src: int, dst: int) -> None:
        """Copy one KV block (every attention layer's, the MTP head's too) to another."""
        _copy_rows(self._kv, [(src, dst)])

    def copy_state(self, src: int, dst: int) -> None:
        """Copy one slot's recurrent state (conv windows + delta-rule states of every GDN layer) to another."""
        _copy_rows(self._gdn, [(src, dst)])

    def copy_states(self, moves: list[tuple[int, int]]) -> None:
        """copy_state for each (src, dst), all at once: distinct dsts, none of them a src."""
        _copy_rows(self._gdn, moves)


def _copy_rows(pairs: list[tuple[torch.Tensor, torch.Tensor]], moves: list[tuple[int, int]]) -> None:
    """Row dst of every tensor = its row src for each (src, dst), in one multi-tensor copy per dtype: a few launches
    on CUDA, not one per tensor and row (torch's fused foreach copy takes lists of one dtype; the conv windows are in
    the model's, the delta-rule states in float32). Snapshots at prompts' ends are on the path to first tokens."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in (t for pair in pairs for t in pair):
        by_dtype.setdefault(t.dtype, []).append(t)
    for tensors in by_dtype.values():
        torch._foreach_copy_([t[dst] for src, dst in moves for t in tensors],
                             [t[src] for src, dst in moves for t in tensors])
