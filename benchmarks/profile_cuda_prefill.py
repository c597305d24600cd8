"""Where a CUDA prefill's time goes (issue 17): time to first token of one prompt, the 64 x 128 batch, and a
profile of host (CPU) against device time per op, on a small model whose kernels are short.

Config: bench_cuda's qwen3.5-0.8b (a Qwen3.5-0.8B-class text model, hidden 1024, 24 layers), RANDOM bf16 weights
built by HF transformers (seed 0), HF timed in the same run on the same weights.
Rows: deltaserve as configured (prefill graphs on), the GPU's busy time in that case (profiler), the same engine
with its prefill graphs off, HF.
TTFT = LLMEngine.add_request to the first token out of step() (greedy), best of a few; HF: one forward of the same
shape (use_cache, last logits) and the argmax read back. --profile: torch.profiler's op table of one 1 x 128
TTFT (add_request and the steps to its token: a prefill graph replay once warm) by host time, the Python
functions it spends its host time in (cProfile), and 10 decode steps by device time.

Run: python benchmarks/profile_cuda_prefill.py [--budget 2048] [--more-budgets 2048] [--profile] [--no-hf]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import pstats

import torch

from bench_cuda import CONFIGS, build, sync_time
from common import batch_time, commit, prompts, ttft
from deltaserve import LLMEngine, SamplingParams
from deltaserve.forward_batch import Segment

CONFIG = CONFIGS["qwen3.5-0.8b"]


def profiled(fn):
    """torch.profiler's averages of one call of fn (after one unprofiled call)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    fn()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof.key_averages()


def profile(fn, sort: str = "self_cpu_time_total", rows: int = 25) -> str:
    return profiled(fn).table(sort_by=sort, row_limit=rows)


def device_ms(fn) -> float:
    """Milliseconds the GPU is busy with kernels and copies in one call of fn: the floor host work cannot lower."""
    return sum(e.self_device_time_total for e in profiled(fn)) / 1e3


def graph_vs_eager(engine: LLMEngine, batch: list[list[int]], name: str) -> str:
    """One prefill step of `batch` (slots 0..n-1) from its prefill graph and eagerly: how far the logits differ."""
    segments = [Segment(p, 0, slot) for slot, p in enumerate(batch)]
    runner, graphs = engine.runner, engine.runner.prefill_graphs
    assert graphs.run(segments) is not None, f"{name}: no prefill graph replayed"
    got = torch.cat(runner.run(segments))
    runner.prefill_graphs = None
    want = torch.cat(runner.run(segments))
    runner.prefill_graphs = graphs
    same = int((got.argmax(-1) == want.argmax(-1)).sum())
    return (f"{name}: graph vs eager logits max |diff| {float((got - want).abs().max()):.3g} "
            f"(logits up to {float(want.abs().max()):.3g}), argmax equal in {same}/{len(batch)}")


def decode_steps(engine: LLMEngine, vocab: int, steps: int = 10):
    """A function running `steps` decode steps of one greedy sequence (CUDA graphs as configured)."""
    engine.add_request("decode", prompts(1, 128, vocab, 9)[0], SamplingParams(max_tokens=64, temperature=0,
                                                                             ignore_eos=True))
    for _ in range(4):
        engine.step()

    def run():
        for _ in range(steps):
            engine.step()
    return run


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=None, help="max_num_batched_tokens (default: the engine's)")
    ap.add_argument("--more-budgets", type=int, nargs="*", default=[2048],
                    help="64 x 128 and 1 x 4096 again at these budgets")
    ap.add_argument("--profile", action="store_true",
                    help="print the profiler's op tables: one 1 x 128 prefill (host), 1 x 4096 and 64 x 128 (device)")
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    hf, ours, cfg = build(*CONFIG)
    opts = {} if args.budget is None else {"max_num_batched_tokens": args.budget}
    engine = LLMEngine(ours, cfg, max_num_seqs=64, max_model_len=4096 + 64, device="cuda", prefill_graphs=True, **opts)
    v, base = cfg.vocab_size, engine.scheduler.budget
    for i in range(3):  # compile, autotune, graphs
        ttft(engine, prompts(1, 128, v, 100 + i)[0], f"warm{i}")
        batch_time(engine, prompts(64, 128, v, 200 + i), f"warmb{i}")
        ttft(engine, prompts(1, 4096, v, 300 + i)[0], f"warml{i}")
    rows = {"ttft 1 x 128 (ms)": min(ttft(engine, prompts(1, 128, v, i)[0], f"t{i}") for i in range(5)) * 1e3,
            "1 x 4096 (ms)": min(ttft(engine, prompts(1, 4096, v, 10 + i)[0], f"l{i}") for i in range(3)) * 1e3,
            "64 x 128 (ms)": min(batch_time(engine, prompts(64, 128, v, 20 + i), f"b{i}") for i in range(3)) * 1e3}
    # a shape not seen before (a 300-token prompt: 384-token graph): eager, then captured, then replayed
    rows.update({f"1 x 300, {when} (ms)": ttft(engine, prompts(1, 300, v, 50 + i)[0], f"n{i}") * 1e3
                 for i, when in enumerate(("first sight: eager", "second: capture", "third: replay"))})
    print("measured so far:", {k: round(t, 2) for k, t in rows.items()}, flush=True)
    agreement = [graph_vs_eager(engine, prompts(n, 128, v, 60), f"{n} x 128") for n in (1, 64)]
    graphs, engine.runner.prefill_graphs = engine.runner.prefill_graphs, None
    eager = {"ttft 1 x 128 (ms)": min(ttft(engine, prompts(1, 128, v, i)[0], f"e{i}") for i in range(5)) * 1e3,
             "1 x 4096 (ms)": min(ttft(engine, prompts(1, 4096, v, 10 + i)[0], f"el{i}") for i in range(3)) * 1e3,
             "64 x 128 (ms)": min(batch_time(engine, prompts(64, 128, v, 20 + i), f"eb{i}") for i in range(3)) * 1e3}
    engine.runner.prefill_graphs = graphs
    print("\n".join(agreement), "\nwithout prefill graphs:", {k: round(t, 2) for k, t in eager.items()}, flush=True)
    tags = iter(range(10 ** 6))
    busy = {"ttft 1 x 128 (ms)": device_ms(lambda: ttft(engine, prompts(1, 128, v, 7)[0], f"g{next(tags)}")),
            "1 x 4096 (ms)": device_ms(lambda: ttft(engine, prompts(1, 4096, v, 7)[0], f"g{next(tags)}")),
            "64 x 128 (ms)": device_ms(lambda: batch_time(engine, prompts(64, 128, v, 7), f"g{next(tags)}"))}
    for budget in args.more_budgets:  # the same engine with another token budget (and prefill chunk)
        engine.scheduler.budget = engine.scheduler.chunk = budget
        batch_time(engine, prompts(64, 128, v, 400), "warmc")
        rows[f"64 x 128, budget {budget} (ms)"] = min(batch_time(engine, prompts(64, 128, v, 20 + i), f"c{budget}-{i}")
                                                      for i in range(3)) * 1e3
        rows[f"1 x 4096, budget {budget} (ms)"] = min(ttft(engine, prompts(1, 4096, v, 10 + i)[0], f"m{budget}-{i}")
                                                      for i in range(3)) * 1e3
    hf_rows = {}
    if not args.no_hf:
        for name, (n, length) in (("ttft 1 x 128 (ms)", (1, 128)), ("1 x 4096 (ms)", (1, 4096)),
                                  ("64 x 128 (ms)", (64, 128))):  # HF has no token budget: one forward
            ids = torch.tensor(prompts(n, length, v, 5), device="cuda")
            fn = lambda ids=ids: hf(input_ids=ids, use_cache=True, logits_to_keep=1).logits.argmax(-1).tolist()
            fn()
            hf_rows[name] = sync_time(fn, 3) * 1e3
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, commit {commit()}, {datetime.date.today()}; "
          f"qwen3.5-0.8b-class, random bf16 weights; token budget {base}; prefill graphs captured: "
          f"{sorted(graphs.graphs)} (a capture failed: {graphs.failed})\n")
    print("| case | deltaserve | its GPU busy time | without prefill graphs | HF | HF / deltaserve (speedup) |\n"
          "|---|---|---|---|---|---|")
    for name, t in rows.items():
        theirs = hf_rows.get(name)
        cells = [f"{x[name]:.2f}" if name in x else "-" for x in (busy, eager, hf_rows)]
        print(f"| {name} | {t:.2f} | {' | '.join(cells)} | {'-' if theirs is None else f'{theirs / t:.2f}x'} |")
    if args.profile:
        first_token = lambda: ttft(engine, prompts(1, 128, v, 7)[0], f"p{next(tags)}")  # noqa: E731
        print(f"one 1 x 128 TTFT ({len(engine.runner.prefill_graphs.graphs)} prefill graphs captured), by host time:")
        print(profile(first_token))
        print("the same, Python functions by their own time (cProfile):")
        stats = cProfile.Profile()
        stats.runcall(first_token)
        pstats.Stats(stats).sort_stats("tottime").print_stats(25)
        for name, fn in (("one 1 x 4096 prefill", lambda: ttft(engine, prompts(1, 4096, v, 8)[0], f"p{next(tags)}")),
                         ("one 64 x 128 batch", lambda: batch_time(engine, prompts(64, 128, v, 8), f"p{next(tags)}"))):
            print(f"{name}, kernels by device time:")
            print(profile(fn, sort="self_device_time_total", rows=20))
        print("10 decode steps of one sequence (LLMEngine.step, graphs), by device time:")
        print(profile(decode_steps(engine, v), sort="device_time_total", rows=30))


if __name__ == "__main__":
    main()
