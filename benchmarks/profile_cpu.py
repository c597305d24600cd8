"""Where a CPU decode step's time goes (issue 9): wall time per model part, and the top torch ops.

Runs the benchmark checkpoint (benchmarks/common.py), prefills np sequences, then times decode steps
with forward hooks on every module: each part's *self* time (its children excluded), summed over
layers, as ms per step and share of the step. "engine" is the step minus the model's forward and
LM head (scheduling, batch building, sampling). Hooks add a few microseconds per module.

Run: python benchmarks/profile_cpu.py [--np 1] [--steps 16] [--threads 2] [--ops]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from common import bench_checkpoint
from deltaserve import LLMEngine, SamplingParams


def part_name(name: str, module: torch.nn.Module, model: torch.nn.Module) -> str:
    """'layers.3.mixer.in_proj' -> 'GatedDeltaNet.in_proj'; containers -> 'Class (self)'."""
    parts = name.split(".")
    if len(parts) >= 2 and "." in name:
        parent = model.get_submodule(".".join(parts[:-1]))
        if not list(module.children()):
            return f"{type(parent).__name__}.{parts[-1]}"
    return f"{type(module).__name__} (self)"


def hook_parts(model: torch.nn.Module, totals: dict) -> None:
    stack: list[list[float]] = []  # [start, children's time]

    def pre(module, args):
        stack.append([time.perf_counter(), 0.0])

    def post(key):
        def fn(module, args, out):
            start, children = stack.pop()
            elapsed = time.perf_counter() - start
            totals[key] += elapsed - children
            if stack:
                stack[-1][1] += elapsed
        return fn

    for name, module in model.named_modules():
        if name and name != "lm_head" and not isinstance(module, torch.nn.ModuleList):  # lm_head: in logits
            module.register_forward_pre_hook(pre)
            module.register_forward_hook(post(part_name(name, module, model)))
    logits = model.logits

    def timed_logits(hidden):
        start = time.perf_counter()
        out = logits(hidden)
        totals["lm_head (logits)"] += time.perf_counter() - start
        return out

    model.logits = timed_logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--np", type=int, default=1)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--ops", action="store_true", help="also print torch.profiler's top ops")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = LLMEngine.from_pretrained(bench_checkpoint(), dtype="float32", max_num_seqs=8, max_model_len=512)
    params = SamplingParams(max_tokens=2 * args.steps + 2, temperature=0, ignore_eos=True)
    for i in range(args.np):
        engine.add_request(str(i), [(7 * i + j) % 1000 for j in range(128)], params)
    while engine.scheduler.waiting or any(not s.output_ids for s in engine.scheduler.running):
        engine.step()
    for _ in range(2):
        engine.step()  # warm-up
    totals: dict[str, float] = defaultdict(float)
    hook_parts(engine.runner.model, totals)
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    step = (time.perf_counter() - start) / args.steps
    totals["engine (step - model)"] = step * args.steps - sum(totals.values())
    print(f"# decode np={args.np}: {step * 1e3:.1f} ms/step ({args.np / step:.1f} t/s), {torch.get_num_threads()} threads")
    print("| part | ms/step | share |\n|---|---|---|")
    for key, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {key} | {t / args.steps * 1e3:.2f} | {t / args.steps / step:.0%} |")
    if args.ops:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                engine.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
