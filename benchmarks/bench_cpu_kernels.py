"""The CPU product kernels per weight format (issue 15): GB/s of weights streamed and GFLOP/s, for 1, 2, 8 and 64
activation rows, weights cold (cycled through more than the L3 cache holds).

A 4096 x 1024 weight per format: F32 and BF16 tensors, and GGUF blocks of every kept type (random bits, finite
scales). Run: python benchmarks/bench_cpu_kernels.py [--threads 1,2] [--formats Q2_K,Q4_K]
"""

from __future__ import annotations

import argparse
import datetime
import time

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from common import commit, machine
from deltaserve.kernels import cpu_native
from deltaserve.kernels.quantized import QuantizedWeight, QuantSegment

N, K = 4096, 1024
FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16}
SCALE_AT = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2],
            Q.Q6_K: [208], Q.IQ4_NL: [0], Q.IQ4_XS: [0], Q.MXFP4: []}


def weight(fmt: str, seed: int):
    if fmt in FLOATS:
        return torch.randn(N, K, generator=torch.Generator().manual_seed(seed)).to(FLOATS[fmt])
    qtype = Q[fmt]
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (N, K // block, size), dtype=np.uint8)
    for at in SCALE_AT[qtype]:
        raw[..., at:at + 2] = rng.uniform(1e-4, 1e-3, raw.shape[:-1]).astype(np.float16)[..., None].view(np.uint8)
    if qtype == Q.MXFP4:
        raw[..., 0] = rng.integers(112, 118, raw.shape[:-1])  # E8M0 scales 2^-16 .. 2^-11
    return QuantizedWeight((N, K), [QuantSegment(qtype, torch.from_numpy(raw.reshape(N, -1)))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--formats", default="F32,BF16,Q8_0,Q4_0,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,IQ4_NL,IQ4_XS,MXFP4")
    args = ap.parse_args()
    print(f"# {machine().split(',')[0]}, torch {torch.__version__}, kernels built for {cpu_native.ops().isa()} | commit "
          f"{commit()} | {datetime.date.today()} | W {N} x {K}, cold; GB/s of weights / GFLOP/s")
    rows = (1, 2, 8, 64)
    print("\n| format | bytes | threads | " + " | ".join(f"{r} row{'s' if r > 1 else ''}" for r in rows) + " |")
    print("|---|---|---|" + "---|" * len(rows))
    for fmt in args.formats.split(","):
        first = cpu_native.pack(weight(fmt, 0))
        copies = [first] + [cpu_native.pack(weight(fmt, s)) for s in range(1, max(2, (128 << 20) // first.nbytes))]
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            cells = []
            for r in rows:
                x = torch.randn(r, K)
                for w in copies:
                    cpu_native.linear(x, w)
                reps = max(len(copies), 3 * len(copies) // max(1, r // 4))
                start = time.perf_counter()
                for i in range(reps):
                    cpu_native.linear(x, copies[i % len(copies)])
                dt = (time.perf_counter() - start) / reps
                cells.append(f"{first.nbytes / dt / 1e9:.1f} / {2 * r * N * K / dt / 1e9:.0f}")
            print(f"| {fmt} | {first.nbytes / 2**20:.1f} MiB | {threads} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
