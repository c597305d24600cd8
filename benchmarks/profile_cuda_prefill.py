"""Where a CUDA prefill's time goes (issue 17): time to first token of one prompt, the 64 x 128 batch, and a
profile of host (CPU) against device time per op, on a small model whose kernels are short.

Config qwen3.5-0.8b: a Qwen3.5-0.8B-class text model (24 layers, 18 GDN + 6 attention, hidden 1024, GDN 16 QK /
16 V heads of 128, attention 8 Q / 2 KV heads of 256, MLP 3584, vocabulary 248320, tied), RANDOM bf16 weights
built by HF transformers (seed 0), HF timed in the same run on the same weights.
TTFT = LLMEngine.add_request to the first token out of step() (greedy); runner = ModelRunner.run of the prefill
alone (host wall time, synchronised).

Run: python benchmarks/profile_cuda_prefill.py [--budget 2048] [--profile] [--no-hf]
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch

from bench_cuda import build, sync_time
from common import commit
from deltaserve import LLMEngine, SamplingParams
from deltaserve.forward_batch import Segment

CONFIG = ("qwen3_5", dict(
    vocab_size=248320, hidden_size=1024, num_hidden_layers=24, intermediate_size=3584, num_attention_heads=8,
    num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16,
    linear_key_head_dim=128, linear_value_head_dim=128, tie_word_embeddings=True))


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


def profile(fn, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    fn()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=None, help="max_num_batched_tokens (default: the engine's)")
    ap.add_argument("--profile", action="store_true", help="print the profiler's op table of one 1 x 128 prefill")
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    hf, ours, cfg = build(*CONFIG)
    opts = {} if args.budget is None else {"max_num_batched_tokens": args.budget}
    engine = LLMEngine(ours, cfg, max_num_seqs=64, max_model_len=4096 + 64, device="cuda", **opts)
    v = cfg.vocab_size
    for i in range(3):  # compile, autotune, graphs
        ttft(engine, prompts(1, 128, v, 100 + i)[0], f"warm{i}")
        batch_time(engine, prompts(64, 128, v, 200 + i), f"warmb{i}")
        ttft(engine, prompts(1, 4096, v, 300 + i)[0], f"warml{i}")
    rows = {"ttft 1 x 128 (ms)": min(ttft(engine, prompts(1, 128, v, i)[0], f"t{i}") for i in range(5)) * 1e3,
            "1 x 4096 (ms)": min(ttft(engine, prompts(1, 4096, v, 10 + i)[0], f"l{i}") for i in range(3)) * 1e3,
            "64 x 128 (ms)": min(batch_time(engine, prompts(64, 128, v, 20 + i), f"b{i}") for i in range(3)) * 1e3}
    seg = [Segment(prompts(1, 128, v, 7)[0], 0, 0)]
    rows["runner.run 1 x 128 (ms)"] = sync_time(lambda: engine.runner.run(seg), 10) * 1e3
    hf_rows = {}
    if not args.no_hf:
        for name, (n, length) in (("ttft 1 x 128 (ms)", (1, 128)), ("1 x 4096 (ms)", (1, 4096)),
                                  ("64 x 128 (ms)", (64, 128))):
            ids = torch.tensor(prompts(n, length, v, 5), device="cuda")
            fn = lambda ids=ids: hf(input_ids=ids, use_cache=True, logits_to_keep=1).logits.argmax(-1).tolist()
            fn()
            hf_rows[name] = sync_time(fn, 3) * 1e3
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, commit {commit()}, {datetime.date.today()}; "
          f"qwen3.5-0.8b-class, random bf16 weights; token budget {engine.scheduler.budget}\n")
    print("| case | deltaserve | HF | HF / deltaserve (speedup) |\n|---|---|---|---|")
    for name, t in rows.items():
        theirs = hf_rows.get(name)
        print(f"| {name} | {t:.2f} | {'-' if theirs is None else f'{theirs:.2f}'} | "
              f"{'-' if theirs is None else f'{theirs / t:.2f}x'} |")
    if args.profile:
        print(profile(lambda: engine.runner.run(seg)))


if __name__ == "__main__":
    main()
