"""Sampling cost per step: the device sampler (`sampling.sampler.sample`) against the per-row host path it
replaced (each sampled row copied to the CPU, filtered with a full sort for top-p, torch.multinomial). On the CPU
the sampler's passes over whole rows run as torch ops or as the C++ kernels (sampler.NativeRows, the default):
both are timed.

Rows of random logits (N(0, 3^2), like a peaky LM head) at Qwen3-Next's and Qwen3.5's vocabularies; B sampled
rows per step; median of 5 after a warm-up. Both paths draw from per-request CPU generators.
Run: python benchmarks/bench_sampler.py [--device cpu cuda] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

from common import commit, machine
from deltaserve.sampling.params import SamplingParams
from deltaserve.sampling import sampler
from deltaserve.sampling.sampler import filter_logits, sample

PARAMS = {"temperature 0.7": SamplingParams(temperature=0.7),
          "top-p 0.9": SamplingParams(temperature=0.7, top_p=0.9),
          "top-k 50, top-p 0.95": SamplingParams(temperature=0.7, top_k=50, top_p=0.95)}


def host_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """The previous sampler: every sampled row filtered and drawn on the CPU."""
    tokens = logits.argmax(-1).tolist()
    for i, p in enumerate(params):
        probs = filter_logits(logits[i].cpu(), p).softmax(-1)
        tokens[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
    return tokens


def step_time(fn, logits, params, device) -> float:
    gens = [torch.Generator().manual_seed(i) for i in range(len(params))]
    fn(logits, params, gens)
    times = []
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(logits, params, gens)  # both end in a host list: the step's tokens
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    takes = sampler.NativeRows.takes
    lines = [f"{machine()}, commit {commit()}, {datetime.date.today()}"
             + (f", {torch.cuda.get_device_name()}" if "cuda" in args.device else ""), "",
             "| device | vocab | rows | params | host path ms/step | device sampler ms/step | speedup | "
             "CPU: torch row passes ms/step | CPU: C++ / torch |", "|---|---|---|---|---|---|---|---|---|"]
    for device in args.device:
        for vocab in (151936, 248320):
            for rows in (1, 16, 64):
                logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows)).mul_(3).to(device)
                for name, p in PARAMS.items():
                    old = step_time(host_rows, logits, [p] * rows, device)
                    new = step_time(sample, logits, [p] * rows, device)
                    cells = "- | - |"
                    if device == "cpu" and sampler.NativeRows.takes(logits):
                        sampler.NativeRows.takes = staticmethod(lambda logits: False)
                        in_torch = step_time(sample, logits, [p] * rows, device)
                        sampler.NativeRows.takes = takes
                        cells = f"{in_torch * 1e3:.2f} | {new / in_torch:.2f} |"
                    lines.append(f"| {device} | {vocab} | {rows} | {name} | {old * 1e3:.2f} | {new * 1e3:.2f} | "
                                 f"{old / new:.1f}x | {cells}")
                    print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
