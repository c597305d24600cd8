"""Quantized weights on CUDA (issue 16): decode against the roofline of the bytes each format reads, beside bf16.

Model: bench_cuda's qwen3-next-8l (Qwen3-Next-80B-A3B's layer dimensions, 8 of its 48 layers), RANDOM weights
(normal, std 0.02), built on the GPU in bf16, then quantized in memory through the quantizers a file would use
(weights/quantize.py) to:
- fp8: Qwen's block-FP8 (128 x 128 scales); the router, shared-expert gate, embedding and LM head stay bf16, as in
  Qwen's FP8 releases (the loader's path from such a file is tested on a tiny checkpoint: tests/cuda).
- q8_0: every matrix Q8_0 but the router and shared-expert gate (kept float by llama-quantize).
- q4_k_m: llama-quantize's Q4_K_M mix: Q4_K, with Q6_K for the LM head and the routed and shared down projections
  of layers i < n/8, i >= 7n/8 or (i - n/8) % 3 == 2 (n = 8: layers 0, 3, 6, 7, the share the rule gives 48).
- q5_k_m: the same mix with Q5_K in place of Q4_K (llama-quantize's Q5_K_M).
Per format: decode step time at np = 1 and 64 (LLMEngine.step, CUDA graphs, overlap on) and its roofline (bytes
read per step: every weight as held, routed experts as the expected number hit, E(1-(1-k/E)^np); states, KV,
logits as bench_cuda; divided by the measured copy bandwidth), prefill tokens/s (4 x 1024), and the memory of the
whole 48-layer model in that format (per-layer bytes of the 8 x 36/6 and 12/2, plus embedding and head).
Kernels: the GEMV of each format on Qwen3-Next's weight shapes, bytes of the weight / time against copy bandwidth.

Run: python benchmarks/bench_cuda_quant.py [--formats bf16 fp8 q8_0 q4_k_m q5_k_m] [--nps 1 64] [--no-kernels | --sweep]
     [--no-model] [--profile] [--i8]
"""

from __future__ import annotations

import argparse
import datetime
import gc

import torch
import triton
from triton.testing import do_bench

from bench_cuda import CONFIGS, PREFILL, copy_bandwidth, ours_decode, prefill
from common import commit
from profile_cuda_prefill import profiled
from deltaserve import LLMEngine
from deltaserve.config import ModelConfig
from deltaserve.forward_batch import Segment
from deltaserve.kernels.gpu_quant import PlanarWeight
from deltaserve.kernels.triton import qgemv_i8 as qi
from deltaserve.kernels.triton import qlinear as ql
from deltaserve.kernels.triton.qtiles import kernel_args
from deltaserve.layers.linear import set_weight
from deltaserve.layers.model import HybridModel
from deltaserve.weights.loader import matrix_params
from deltaserve.weights.quantize import quantize_model, quantize_planar

FULL_LAYERS = 48
FLOAT_KEPT = ("router.weight", "shared_gate.weight")  # never quantized by llama-quantize or Qwen's FP8


def more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def fmt_of(fmt: str, cfg: ModelConfig):
    def pick(name: str) -> str | None:
        if fmt == "bf16" or name.endswith(FLOAT_KEPT):
            return None
        if fmt == "fp8":
            return None if name.startswith(("embed.", "lm_head.")) else "fp8"
        if fmt == "q8_0":
            return "q8_0"
        layer = int(name.split(".")[1]) if name.startswith("layers.") else -1
        down = name.endswith(("experts_down", "shared.down.weight", "ffn.down.weight"))
        base = "q5_k" if fmt == "q5_k_m" else "q4_k"
        return "q6_k" if name.startswith("lm_head.") or down and more_bits(layer, cfg.num_layers) else base
    return pick


def random_model(name: str) -> tuple[HybridModel, ModelConfig]:
    arch, overrides = CONFIGS[name]
    cfg = ModelConfig.from_dict({**overrides, "model_type": arch})
    torch.manual_seed(0)
    with torch.device("meta"):
        model = HybridModel(cfg)
    for module in model.modules():
        for pname, p in [(n, p) for n, p in module._parameters.items() if p is not None]:
            value = torch.randn(p.shape, device="cuda", dtype=torch.bfloat16) * 0.02
            module._parameters[pname] = torch.nn.Parameter(value, requires_grad=False)
    return model.eval(), cfg


def held(model: HybridModel):
    """(name, weight) of every parameter and quantized matrix the model holds (a tied one once)."""
    seen = set()
    for mname, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr == "_parameters":
                items = value.items()
            else:
                items = [(attr, value)] if isinstance(value, PlanarWeight) else []
            for pname, w in items:
                if w is not None and id(w) not in seen:
                    seen.add(id(w))
                    yield f"{mname}.{pname}".lstrip("."), w


def nbytes(w) -> int:
    return w.nbytes if isinstance(w, PlanarWeight) else w.numel() * w.element_size()


def decode_bytes(model: HybridModel, cfg: ModelConfig, np_: int, ctx: int) -> float:
    total = 0.0
    for name, w in held(model):
        n = nbytes(w)
        if "experts_" in name:
            n *= 1 - (1 - cfg.top_k / cfg.num_experts) ** np_
        elif name == "embed.weight" and model.lm_head is not None:
            n = np_ * n / w.shape[0]
        total += n
    state = cfg.num_v_heads * cfg.k_head_dim * cfg.v_head_dim * 4 + (cfg.conv_kernel - 1) * cfg.conv_dim * 2
    kv_row = 2 * cfg.num_kv_heads * cfg.head_dim * 2
    return total + np_ * (len(cfg.gdn_layers) * 2 * state + len(cfg.attn_layers) * (ctx + 1) * kv_row +
                          cfg.vocab_size * 4)


def full_model_bytes(model: HybridModel, cfg: ModelConfig) -> float:
    """The 48-layer model's weights: this model's per-layer bytes by kind, scaled to 36 GDN + 12 attention."""
    per = {"linear_attention": [], "full_attention": []}
    for i, kind in enumerate(cfg.layer_types):
        per[kind].append(sum(nbytes(w) for _, w in held(model.layers[i])))
    rest = sum(nbytes(w) for name, w in held(model) if not name.startswith("layers."))
    return rest + 36 * sum(per["linear_attention"]) / len(per["linear_attention"]) + \
        12 * sum(per["full_attention"]) / len(per["full_attention"])


@torch.inference_mode()
def run_format(model, cfg, fmt: str, bandwidth: float, nps: list[int], profile: bool = False) -> dict:
    saved = {name: getattr(model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2])
             for name in matrix_params(model)}
    quantize_model(model, fmt_of(fmt, cfg))
    torch.cuda.empty_cache()
    res = {"format": fmt, "weights_gb": sum(nbytes(w) for _, w in held(model)) / 1e9,
           "full_model_gb": full_model_bytes(model, cfg) / 1e9, "decode": []}
    engine = LLMEngine(model, cfg, None, max_num_seqs=max(nps), max_model_len=PREFILL[1] + 64,
                       max_num_batched_tokens=max(nps) * 128, device="cuda")
    for np_ in nps:
        t, ctx = ours_decode(engine, cfg.vocab_size, np_, overlap=True)
        roof = decode_bytes(model, cfg, np_, ctx) / bandwidth
        res["decode"].append({"np": np_, "ms": t * 1e3, "roof_ms": roof * 1e3, "ratio": t / roof})
        print(fmt, res["decode"][-1], flush=True)
        graph = engine.runner.graphs
        if profile and graph is not None:  # the decode graph's kernels by device time (its last inputs replayed)
            replay = graph.graphs[graph.size_of[np_]][0].replay
            events = profiled(replay)
            kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = sum(e.self_device_time_total for e in kernels) / 1e3
            print(f"{fmt} np={np_}: one decode-graph replay: {sum(e.count for e in kernels)} kernels, device busy "
                  f"{busy:.3f} ms of the {t * 1e3:.3f} ms step (the rest: gaps between kernels, host)", flush=True)
            print(events.table(sort_by="self_device_time_total", row_limit=16), flush=True)
    n, length = PREFILL
    prompts = torch.randint(cfg.vocab_size, (n, length), generator=torch.Generator().manual_seed(2))
    segs = [Segment(p, 0, s) for s, p in enumerate(prompts.tolist())]
    res["prefill_tps"] = n * length / prefill(lambda: engine.runner.run(segs))
    engine.cache = engine.runner = None  # the KV cache and states, before the next format's
    for name, w in saved.items():
        module_name, _, attr = name.rpartition(".")
        set_weight(model.get_submodule(module_name), attr, w)
    torch.cuda.empty_cache()
    print(fmt, {k: v for k, v in res.items() if k != "decode"}, flush=True)
    return res


GEMV_SHAPES = [(12352, 2048), (2048, 4096), (2048, 512), (151936, 2048)]


# (kind, BN, BK, warps): "float" = qgemv_kernel (bf16 x, per-group float dots; BK 0 = the whole row in one step),
# "i8" = qgemv_i8_kernel (x quantized to int8 beforehand, dp4a; not fp8)
GEMV_VARIANTS = [("float", 2, 0, 4), ("float", 4, 1024, 4), ("i8", 4, 2048, 4), ("i8", 2, 4096, 4),
                 ("i8", 8, 1024, 4), ("i8", 8, 2048, 8), ("i8", 16, 512, 4), ("i8", 1, 4096, 2)]


def launch_variant(x: torch.Tensor, xq: tuple, w: PlanarWeight, out: torch.Tensor, variant: tuple) -> None:
    kind, bn, bk, warps = variant
    seg, (n, k) = w.segments[0], w.shape
    if kind == "i8":
        qi.qgemv_i8(xq, seg, out, bn=bn, bk=bk, num_warps=warps)
        return
    bk = bk or k
    q, s, q2, d, fmt, gs, rb = kernel_args(seg, bk)
    ql.qgemv_kernel[(triton.cdiv(n, bn),)](x, q, s, q2, d, out, n, x, 0, x, 0., K=k, FMT=fmt, BN=bn, BK=bk, GS=gs,
                                           RB=rb, PRO=0, HD=1, PDL=False, num_warps=warps)


def qlinear_int8_x(x: torch.Tensor, w: PlanarWeight, out: torch.Tensor) -> None:
    """qlinear with the int8-x GEMV switched on (x's quantization and the GEMV: two launches)."""
    ql.I8_GEMV = True
    try:
        ql.qlinear(x, w, out)
    finally:
        ql.I8_GEMV = False


def chained_time(fn, ws: list) -> float:
    """Seconds per call of fn(w) with the calls back to back in one CUDA graph, one per weight copy in ws (as a decode
    graph runs its kernels, programmatic dependent launches included), median of 5 replays. do_bench times one call
    after a cache flush, launch latency and ramp included: the cost of a kernel alone, not inside a decode step."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for w in ws:
            fn(w)  # compiles and allocates outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in ws:
            fn(w)
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(ws))
    return sorted(times)[2]


def kernels(bandwidth: float, sweep: bool) -> list[str]:
    """GEMV (one bf16 row) per format and shape: weight bytes / time, against copy bandwidth; the default path
    (qlinear), or (sweep) every variant of GEMV_VARIANTS and the x quantization alone; each result is checked
    against the float product of the dequantized weights (err: relative norm, printed where > 1e-2). Weights
    rotate through copies of > 120 MB in all, so no call finds its weight in L2 (50 MB). "chained": the same calls back
    to back in a CUDA graph (chained_time), weight bytes / time against copy bandwidth."""
    lines = ["| format | N x K | variant | weight MB | us | GB/s | x copy bandwidth | chained us | x, chained |",
             "|---|---|---|---|---|---|---|---|---|"]
    for fmt in ("fp8", "q8_0", "q4_k", "q5_k", "q6_k"):
        for n, k in GEMV_SHAPES if not sweep else [s for s in GEMV_SHAPES if s[1] != 512]:
            w0 = quantize_planar(torch.randn(n, k, device="cuda"), fmt)
            ws = [w0] + [quantize_planar(torch.randn(n, k, device="cuda"), fmt)
                         for _ in range(min(63, int(120e6 // w0.nbytes)))]
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            want = x.float() @ w0.dequantize().T
            out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
            runs = [("qlinear", lambda w: ql.qlinear(x, w, out))]
            if fmt in qi.I8_FORMATS:
                runs.append(("qlinear, int8-x GEMV", lambda w: qlinear_int8_x(x, w, out)))
            if sweep:
                xq = qi.quantize_x(x, fmt != "q8_0") if fmt in qi.I8_FORMATS else None
                runs += [(v, lambda w, v=v: launch_variant(x, xq, w, out, v)) for v in GEMV_VARIANTS
                         if (v[2] or k <= 4096) and (v[0] == "float" or xq is not None and v[2] <= k)]
                if xq is not None:
                    runs.append(("quantize x", lambda w: qi.quantize_x(x, fmt != "q8_0")))
            for name, fn in runs:
                out.zero_()
                fn(w0)
                err = ((out.float() - want).norm() / want.norm()).item()
                it = iter(range(10 ** 9))
                t = do_bench(lambda: fn(ws[next(it) % len(ws)]), warmup=25, rep=100, return_mode="median") / 1e3
                try:  # never run on a GPU when written: a failure costs its column, not the table
                    tc = chained_time(fn, ws)
                    ratio = "-" if name == "quantize x" else f"{w0.nbytes / tc / bandwidth:.2f}"
                    chained = f"{tc * 1e6:.1f} | {ratio} |"
                except RuntimeError as e:
                    chained = f"- | - | ({str(e).splitlines()[0][:80]})"
                moved = f"- | - | {chained}" if name == "quantize x" else \
                    f"{w0.nbytes / t / 1e9:.0f} | {w0.nbytes / t / bandwidth:.2f} | {chained}"
                lines.append(f"| {fmt} | {n} x {k} | {name} | {w0.nbytes / 1e6:.1f} | {t * 1e6:.1f} | {moved}"
                             + (f" err {err:.1e}" if err > 1e-2 and name != "quantize x" else ""))
                print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", nargs="+", default=["bf16", "fp8", "q8_0", "q4_k_m"])
    ap.add_argument("--nps", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--no-kernels", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time every GEMV block variant")
    ap.add_argument("--no-model", action="store_true", help="the kernel table only")
    ap.add_argument("--profile", action="store_true", help="print each decode graph's kernels by device time")
    ap.add_argument("--i8", action="store_true", help="q8_0 and q4_k_m also with the int8-x GEMV (qgemv_i8.py)")
    args = ap.parse_args()
    bandwidth = copy_bandwidth()
    head = (f"{torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write), torch "
            f"{torch.__version__}, commit {commit()}, {datetime.date.today()}; qwen3-next-8l, random weights")
    kernel_lines = [] if args.no_kernels else kernels(bandwidth, args.sweep)
    if args.no_model:
        print("\n".join([head, ""] + kernel_lines))
        return
    model, cfg = random_model("qwen3-next-8l")
    results = []
    for fmt in args.formats:
        for int8_x in [False] + ([True] if args.i8 and fmt in ("q8_0", "q4_k_m") else []):
            ql.I8_GEMV = int8_x
            results.append(run_format(model, cfg, fmt, bandwidth, args.nps, args.profile))
            results[-1]["format"] += " int8-x GEMV" if int8_x else ""
            gc.collect()
            torch.cuda.empty_cache()
    ql.I8_GEMV = False
    total = torch.cuda.get_device_properties(0).total_memory
    lines = [head, "", "| format | np | ms/step | tok/s | roofline ms | x roofline |", "|---|---|---|---|---|---|"]
    for r in results:
        for d in r["decode"]:
            lines.append(f"| {r['format']} | {d['np']} | {d['ms']:.3f} | {d['np'] / d['ms'] * 1e3:.0f} | "
                         f"{d['roof_ms']:.3f} | {d['ratio']:.2f} |")
    lines += ["", "| format | weights held (8 layers) GB | 48-layer model GB | fits this card's "
              f"{total / 2**30:.1f} GiB | prefill 4x1024 t/s |", "|---|---|---|---|---|"]
    for r in results:
        fits = "yes" if r["full_model_gb"] * 1e9 < 0.95 * total else "no"
        lines.append(f"| {r['format']} | {r['weights_gb']:.2f} | {r['full_model_gb']:.1f} | {fits} | "
                     f"{r['prefill_tps']:.0f} |")
    print("\n".join(lines + [""] + kernel_lines))


if __name__ == "__main__":
    main()
