"""Kernel variants on CUDA, timed in one run (issue 7): the measurements behind the choices in kernels/triton.

1. Recurrent delta-rule decode kernel: V-block width BV (state bytes moved / time).
0. One-row products (decode np=1): the Triton GEMV vs cuBLAS on every weight shape of bench_cuda's models;
   the SwiGLU input half: the GEMV with SiLU * up in its epilogue (rows per half 1 / 2) vs GEMV + gate launch.
2. Decode attention: Triton split-K over the KV cache by slot vs gather + SDPA (the reference's way).
3. Prefill attention: Triton varlen over the cache vs padded gather + SDPA with a causal mask.
4. Routed experts from router logits: Triton (route, layout, grouped matmuls) vs torch ops + torch._grouped_mm.
Shapes are Qwen3-Next's (H=32 V heads of 128; attention 16 Q / 2 KV heads of 256; 512 experts top-10,
width 512, hidden 2048), bf16 with float32 states. Random inputs; median of triton.testing.do_bench.

Run: python benchmarks/bench_cuda_kernels.py [gemv recurrent attention moe]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from deltaserve.kernels.triton.attention import decode_attention, prefill_attention
from deltaserve.kernels.triton.linear import gemv as triton_gemv
from deltaserve.kernels.triton.linear import linear
from deltaserve.kernels.triton.moe import expert_layout, grouped_matmul
from deltaserve.kernels.triton.moe_route import route
from deltaserve.kernels.triton.recurrent import gdn_recurrent_fwd
from deltaserve.kernels.triton.rowwise import gate_mul

DEV, BF16 = "cuda", torch.bfloat16


def ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def gemv(rows: list[str]) -> None:
    shapes = {"qwen3.5-2b": [(8224, 2048), (2048, 2048), (5120, 2048), (12288, 2048), (2048, 6144), (248320, 2048)],
              "qwen3-next-8l": [(12352, 2048), (2048, 4096), (9216, 2048), (512, 2048), (1024, 2048), (2048, 512),
                                (151936, 2048)]}
    for model, mats in shapes.items():
        for n, k in mats:
            ws = [torch.randn(n, k, dtype=BF16, device=DEV) for _ in range(4)]  # rotated: weights never in L2
            x = torch.randn(1, k, dtype=BF16, device=DEV)
            times = {}
            for name, fn in (("cuBLAS", F.linear), ("Triton", linear)):
                it = iter(range(10 ** 9))
                times[name] = ms(lambda fn=fn, it=it, ws=ws, x=x: fn(x, ws[next(it) % 4]))
            gbs = {name: n * k * 2 / t / 1e6 for name, t in times.items()}
            rows.append(f"| one-row linear | {model} {n} x {k} | Triton {times['Triton'] * 1e3:.1f} us "
                        f"({gbs['Triton']:.0f} GB/s) | cuBLAS {times['cuBLAS'] * 1e3:.1f} us "
                        f"({gbs['cuBLAS']:.0f} GB/s) |")
    for model, (i, k) in (("qwen3.5-2b MLP", (6144, 2048)), ("qwen3-next shared expert", (512, 2048))):
        ws = [torch.randn(2 * i, k, dtype=BF16, device=DEV) for _ in range(4)]
        x = torch.randn(1, k, dtype=BF16, device=DEV)
        it = iter(range(10 ** 9))

        def unfused(w):
            h = linear(x, w)
            return gate_mul(h[:, i:], h[:, :i], sigmoid=False)

        t_un = ms(lambda: unfused(ws[next(it) % 4]))
        fused = [ms(lambda bn=bn: triton_gemv(x, ws[next(it) % 4], bn=bn, swiglu=True)) for bn in (1, 2)]
        rows.append(f"| one-row SwiGLU in | {model} 2x{i} x {k} | fused, 1 / 2 rows per half: "
                    f"{fused[0] * 1e3:.1f} / {fused[1] * 1e3:.1f} us ({2 * i * k * 2 / min(fused) / 1e6:.0f} GB/s) | "
                    f"GEMV + gate {t_un * 1e3:.1f} us |")


def recurrent(rows: list[str]) -> None:
    hk, h, dk, dv = 16, 32, 128, 128
    for b in (1, 8, 64, 256):
        pool = torch.randn(b + 1, h, dk, dv, device=DEV)
        x = torch.randn(b, 2 * hk * dk + h * dv, dtype=BF16, device=DEV)
        ab = torch.randn(b, 2 * h, dtype=BF16, device=DEV)
        a_log, dt = torch.rand(h, device=DEV), torch.randn(h, device=DEV)
        slots, reset, cu = torch.randperm(b + 1, device=DEV)[:b], torch.zeros(b, dtype=torch.bool, device=DEV), \
            torch.arange(b + 1, device=DEV)
        for bv in (16, 32):
            t = ms(lambda: gdn_recurrent_fwd(x, ab[:, :h], ab[:, h:], a_log, dt, pool, cu, slots, reset, hk, bv=bv))
            gbs = 2 * b * h * dk * dv * 4 / t / 1e6
            rows.append(f"| recurrent decode | np={b} BV={bv} | {t * 1e3:.1f} us | {gbs:.0f} GB/s of state |")


def sdpa_over_gather(q, k_cache, v_cache, slots, q_pos, width, scale):
    """The reference's way: gather each slot's keys [B, W, G, D], SDPA with a causal mask."""
    keys, values = k_cache[slots, :width], v_cache[slots, :width]
    mask = (torch.arange(width, device=DEV) <= q_pos[..., None])[:, None]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def attention(rows: list[str]) -> None:
    h, g, d, slots_n, m = 16, 2, 256, 257, 1280
    caches = torch.randn(2, slots_n, m, g, d, dtype=BF16, device=DEV)
    table = torch.arange(slots_n, dtype=torch.int32, device=DEV)[:, None]  # one block of m positions per slot
    for b, ctx in ((1, 128), (1, 1024), (64, 128), (64, 1024), (256, 128)):
        q = torch.randn(b, h, d, dtype=BF16, device=DEV)
        slots = torch.randperm(slots_n, device=DEV)[:b]
        pos = torch.full((b,), ctx - 1, device=DEV)
        t_tri = ms(lambda: decode_attention(q, caches[0], caches[1], table, slots, pos, d ** -0.5))
        t_sdpa = ms(lambda: sdpa_over_gather(q[:, None], caches[0], caches[1], slots, pos[:, None], ctx, d ** -0.5))
        rows.append(f"| decode attention | np={b} ctx={ctx} | Triton {t_tri * 1e3:.1f} us | "
                    f"gather+SDPA {t_sdpa * 1e3:.1f} us |")
    n, length = 4, 1024
    q = torch.randn(n * length, h, d, dtype=BF16, device=DEV)
    slots = torch.arange(n, device=DEV)
    cu = torch.arange(n + 1, device=DEV) * length
    pos = torch.arange(length, device=DEV).repeat(n)
    chunks = torch.tensor([(s, c) for s in range(n) for c in range(length // 64)], device=DEV)  # [NT, 2]
    t_tri = ms(lambda: prefill_attention(q, caches[0], caches[1], table, cu, slots, pos, 0, chunks, d ** -0.5))
    qp = q.view(n, length, h, d)
    t_sdpa = ms(lambda: sdpa_over_gather(qp, caches[0], caches[1], slots, pos.view(n, length), length, d ** -0.5))
    flops = 4 * n * length * length / 2 * h * d
    rows.append(f"| prefill attention | 4 x 1024 causal | Triton {t_tri:.2f} ms ({flops / t_tri / 1e9:.0f} TFLOP/s) | "
                f"gather+SDPA {t_sdpa:.2f} ms |")


def triton_experts(logits, x, gate_up, down, k):
    """Routing + grouped matmuls of kernels/triton/moe.py, up to the per-pair outputs summed per token."""
    work = torch.zeros(2, gate_up.shape[0], dtype=torch.int32, device=DEV)
    weights, experts = route(logits, k, True, work[0])
    layout = expert_layout(experts.view(-1), work[0], work[1])
    hidden = grouped_matmul(x, gate_up, gate_up.shape[1] // 2, layout, k)
    y = grouped_matmul(hidden, down, x.shape[1], layout, k, pair_scale=weights.view(-1))
    return y.view(x.shape[0], k, -1).sum(1)


def grouped_mm_experts(logits, x, gate_up, down, k):
    """The same with torch ops: softmax, top-k, sort by expert, torch._grouped_mm twice, unsort, sum."""
    weights, experts = torch.softmax(logits.float(), -1).topk(k)
    weights = weights / weights.sum(-1, keepdim=True)
    sorted_e, order = experts.flatten().sort(stable=True)
    offs = torch.searchsorted(sorted_e, torch.arange(1, gate_up.shape[0] + 1, device=DEV)).to(torch.int32)
    gate, up = torch._grouped_mm(x[order // k], gate_up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs=offs)
    y = y * weights.flatten()[order, None].to(y.dtype)
    return y[order.argsort()].view(x.shape[0], k, -1).sum(1)


def moe(rows: list[str]) -> None:
    e, k, d, i = 512, 10, 2048, 512
    gate_up = torch.randn(e, 2 * i, d, dtype=BF16, device=DEV) / d ** 0.5
    down = torch.randn(e, d, i, dtype=BF16, device=DEV) / i ** 0.5
    for t in (1, 64, 256, 4096):
        x = torch.randn(t, d, dtype=BF16, device=DEV)
        logits = torch.randn(t, e, dtype=BF16, device=DEV) * 3
        active = logits.topk(k).indices.unique().numel()
        t_tri = ms(lambda: triton_experts(logits, x, gate_up, down, k))
        t_gmm = ms(lambda: grouped_mm_experts(logits, x, gate_up, down, k))
        a = triton_experts(logits, x, gate_up, down, k).float()
        b = grouped_mm_experts(logits, x, gate_up, down, k).float()
        gbs = active * 3 * i * d * 2 / t_tri / 1e6
        diff = float((a - b).norm() / b.norm())
        rows.append(f"| routed experts | T={t} ({active} experts hit) | Triton {t_tri * 1e3:.0f} us ({gbs:.0f} GB/s of "
                    f"weights) | torch._grouped_mm {t_gmm * 1e3:.0f} us | rel. diff {diff:.1e} |")


def main() -> None:
    torch.manual_seed(0)
    rows = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", "",
            "| kernel | shape | time | other |", "|---|---|---|---|"]
    parts = {"gemv": gemv, "recurrent": recurrent, "attention": attention, "moe": moe}
    for name in sys.argv[1:] or parts:
        parts[name](rows)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
