"""Per-sequence state: conv windows and fp32 delta-rule states per GDN layer, KV cache per attention layer.

S = slots, K = conv width, C = conv channels, H = V heads, Dk/Dv = head dims,
M = max_model_len, G = KV heads, D = head dim.

Slots [0, max_num_seqs) belong to running sequences (state slot == KV row). Slots past that are
spare states (`extra_state_slots`) with no KV row: snapshots for benchmarks and prefix caching,
and one state per draft position for speculative decoding. Memory is sized up front.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig


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


def cache_size(cfg: ModelConfig, max_num_seqs: int, max_model_len: int, dtype: torch.dtype,
               extra_state_slots: int = 0, mtp_layers: int = 0) -> CacheSize:
    slots = max_num_seqs + extra_state_slots
    elem = torch.tensor([], dtype=dtype).element_size()
    n_gdn, n_attn = len(cfg.gdn_layers), len(cfg.attn_layers)
    conv = n_gdn * slots * (cfg.conv_kernel - 1) * cfg.conv_dim * elem
    state = n_gdn * slots * cfg.num_v_heads * cfg.k_head_dim * cfg.v_head_dim * 4
    kv = (n_attn + mtp_layers) * 2 * max_num_seqs * max_model_len * cfg.num_kv_heads * cfg.head_dim * elem
    return CacheSize(conv, state, kv)


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


class HybridCache:
    def __init__(self, cfg: ModelConfig, max_num_seqs: int, max_model_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", extra_state_slots: int = 0, mtp_layers: int = 0):
        device = torch.device(device)
        self.size = cache_size(cfg, max_num_seqs, max_model_len, dtype, extra_state_slots, mtp_layers)
        free = available_memory(device)
        if self.size.total > 0.9 * free:
            raise CacheTooLarge(
                f"cache needs {self.size.describe()}, but only {free / 2**20:.0f} MiB are free on {device}: "
                "lower max_num_seqs or max_model_len"
            )
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.num_slots = max_num_seqs + extra_state_slots
        s, w = self.num_slots, cfg.conv_kernel - 1
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i in cfg.gdn_layers:
            conv = torch.zeros(s, w, cfg.conv_dim, dtype=dtype, device=device)  # [S, K-1, C]
            ssm = torch.zeros(s, cfg.num_v_heads, cfg.k_head_dim, cfg.v_head_dim, dtype=torch.float32, device=device)
            self._layers[i] = (conv, ssm)
        shape = (max_num_seqs, max_model_len, cfg.num_kv_heads, cfg.head_dim)  # [S, M, G, D]
        for i in cfg.attn_layers:
            self._layers[i] = (torch.zeros(shape, dtype=dtype, device=device),
                               torch.zeros(shape, dtype=dtype, device=device))
        # the MTP head's own attention KV (speculative decoding), one per MTP layer
        self.mtp_kv = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                       for _ in range(mtp_layers)]
        self._gdn = [self._layers[i] for i in cfg.gdn_layers]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv pool, delta-rule pool) of a GDN layer, or (k cache, v cache) of an attention layer."""
        return self._layers[i]

    def copy_state(self, src: int, dst: int) -> None:
        """Copy one slot's recurrent state (conv windows + delta-rule states of every GDN layer) to another."""
        for conv, ssm in self._gdn:
            conv[dst].copy_(conv[src])
            ssm[dst].copy_(ssm[src])
