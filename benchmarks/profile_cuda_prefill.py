"""Where a CUDA prefill's time goes (issue 17): time to first token of one prompt, the 64 x 128 batch, and a
profile of host (CPU) against device time per op, on a small model whose kernels are short.

Config: bench_cuda's qwen3.5-0.8b (a Qwen3.5-0.8B-class text model, hidden 1024, 24 layers), RANDOM bf16 weights
built by HF transformers (seed 0), HF timed in the same run on the same weights.
TTFT = LLMEngine.add_request to the first token out of step() (greedy), best of a few; HF: one forward of the same
shape (use_cache, last logits) and the argmax read back. --profile: torch.profiler's op table of one 1 x 128
prefill (ModelRunner.run) by host time, and of 10 decode steps by device time.

Run: python benchmarks/profile_cuda_prefill.py [--budget 2048] [--more-budgets 2048] [--profile] [--no-hf]
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch

from bench_cuda import CONFIGS, build, sync_time
from common import commit
from deltaserve import LLMEngine, SamplingParams
from deltaserve.forward_batch import Segment

CONFIG = CONFIGS["qwen3.5-0.8b"]


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    return torch.randint(vocab, (n, length), generator=torch.Generator().manual_seed(seed)).tolist()


def ttft(engine: LLMEngine, prompt: list[int], tag: str) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.add_request(tag, prompt, SamplingParams(max_tokens=1, temperature=0))
    while not any(o.token_ids for o in engine.step()):
        pass
    return time.perf_counter() - start


def batch_time(engine: LLMEngine, batch: list[list[int]], tag: str) -> float:
    """Seconds from adding every prompt to every first token (max_tokens=1)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i, p in enumerate(batch):
        engine.add_request(f"{tag}-{i}", p, SamplingParams(max_tokens=1, temperature=0))
    while engine.has_unfinished_requests():
        engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def profile(fn, sort: str = "self_cpu_time_total", rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    fn()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


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
    ap.add_argument("--profile", action="store_true", help="print the profiler's op table of one 1 x 128 prefill")
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    hf, ours, cfg = build(*CONFIG)
    opts = {} if args.budget is None else {"max_num_batched_tokens": args.budget}
    engine = LLMEngine(ours, cfg, max_num_seqs=64, max_model_len=4096 + 64, device="cuda", **opts)
    v, base = cfg.vocab_size, engine.scheduler.budget
    for i in range(3):  # compile, autotune, graphs
        ttft(engine, prompts(1, 128, v, 100 + i)[0], f"warm{i}")
        batch_time(engine, prompts(64, 128, v, 200 + i), f"warmb{i}")
        ttft(engine, prompts(1, 4096, v, 300 + i)[0], f"warml{i}")
    rows = {"ttft 1 x 128 (ms)": min(ttft(engine, prompts(1, 128, v, i)[0], f"t{i}") for i in range(5)) * 1e3,
            "1 x 4096 (ms)": min(ttft(engine, prompts(1, 4096, v, 10 + i)[0], f"l{i}") for i in range(3)) * 1e3,
            "64 x 128 (ms)": min(batch_time(engine, prompts(64, 128, v, 20 + i), f"b{i}") for i in range(3)) * 1e3}
    for budget in args.more_budgets:  # the same engine with another token budget (and prefill chunk)
        engine.scheduler.budget = engine.scheduler.chunk = budget
        batch_time(engine, prompts(64, 128, v, 400), "warmc")
        rows[f"64 x 128, budget {budget} (ms)"] = min(batch_time(engine, prompts(64, 128, v, 20 + i), f"c{budget}-{i}")
                                                      for i in range(3)) * 1e3
        rows[f"1 x 4096, budget {budget} (ms)"] = min(ttft(engine, prompts(1, 4096, v, 10 + i)[0], f"m{budget}-{i}")
                                                      for i in range(3)) * 1e3
    seg = [Segment(prompts(1, 128, v, 7)[0], 0, 0)]
    hf_rows = {}
    if not args.no_hf:
        for name, (n, length) in (("ttft 1 x 128 (ms)", (1, 128)), ("1 x 4096 (ms)", (1, 4096)),
                                  ("64 x 128 (ms)", (64, 128))):  # HF has no token budget: one forward
            ids = torch.tensor(prompts(n, length, v, 5), device="cuda")
            fn = lambda ids=ids: hf(input_ids=ids, use_cache=True, logits_to_keep=1).logits.argmax(-1).tolist()
            fn()
            hf_rows[name] = sync_time(fn, 3) * 1e3
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, commit {commit()}, {datetime.date.today()}; "
          f"qwen3.5-0.8b-class, random bf16 weights; token budget {base}\n")
    print("| case | deltaserve | HF | HF / deltaserve (speedup) |\n|---|---|---|---|")
    for name, t in rows.items():
        theirs = hf_rows.get(name)
        print(f"| {name} | {t:.2f} | {'-' if theirs is None else f'{theirs:.2f}'} | "
              f"{'-' if theirs is None else f'{theirs / t:.2f}x'} |")
    if args.profile:
        print("one 1 x 128 prefill (ModelRunner.run), by host time:")
        print(profile(lambda: engine.runner.run(seg)))
        print("10 decode steps of one sequence (LLMEngine.step, graphs), by device time:")
        print(profile(decode_steps(engine, v), sort="device_time_total", rows=30))


if __name__ == "__main__":
    main()
