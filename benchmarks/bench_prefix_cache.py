"""Prefix caching (issue 18): a multi-turn chat's time to first token per turn, and the cost on a workload that
shares nothing, with the cache on and off in the same run (two engines, the same weights, turns alternated).

1. Chat: a first message (--first, default 500 tokens), then turns that each add the model's reply (32 tokens)
   and a new user message (--message, default 450 tokens): 8 turns grow to ~4k tokens. A cached turn computes
   only its new tokens, so its speedup is at most about (prompt tokens / new tokens) plus attention's growth;
   --first 2500 --message 180 is a long document or system prompt followed by short questions.
   TTFT = add_request to the first output token.
2. No shared prefixes: 16 random 256-token prompts, 32 new tokens each, 8 at a time; tokens/s (prompt + output)
   over the whole run, rounds alternated, best of each.

Run: python benchmarks/bench_prefix_cache.py [--device cuda] [--turns 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch

from common import bench_checkpoint, commit, machine
from deltaserve import LLMEngine, SamplingParams


def rand_tokens(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def ttft(engine: LLMEngine, rid: str, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """(seconds to the first output token, all output tokens)."""
    start = time.perf_counter()
    engine.add_request(rid, prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    first, out = None, []
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.token_ids and first is None:
                first = time.perf_counter() - start
            out = o.token_ids
    return first, out


def chat(engines: dict[str, LLMEngine], turns: int, first: int, message: int, vocab: int, sync,
         exact: bool, seed: int = 0) -> list[tuple[int, int, float, float, int, int]]:
    """Rows (turn, prompt tokens, TTFT off, TTFT on, cached tokens, output tokens equal to the uncached run's
    before the first difference). exact (float32): every token must be equal; in bf16 a resumed run's rounding
    differs from an uncached one's (the state at the hit came from decode steps, not one prefill) and a random
    model's near-ties may flip. The chat continues with the cached run's reply."""
    history = rand_tokens(first, 1000 * seed, vocab)
    rows = []
    for t in range(turns):
        times, outs, cached = {}, {}, {}
        for name, eng in engines.items():
            before = eng.kv.stats.cached_tokens
            times[name], outs[name] = ttft(eng, f"chat{seed}-turn{t}", history, 32)
            sync()
            cached[name] = eng.kv.stats.cached_tokens - before
        equal = next((i for i, (a, b) in enumerate(zip(outs["on"], outs["off"])) if a != b), len(outs["on"]))
        assert equal == len(outs["on"]) or not exact, f"turn {t}: outputs differ with the cache"
        rows.append((t + 1, len(history), times["off"], times["on"], cached["on"], equal))
        history = history + outs["on"] + rand_tokens(message, 1000 * seed + t + 1, vocab)
    return rows


def throughput(engine: LLMEngine, vocab: int, round_: int, sync) -> float:
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    prompts = [rand_tokens(256, 1000 * round_ + i, vocab) for i in range(16)]  # fresh: nothing to hit
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"x{round_}-{i}", p, params)
    while engine.has_unfinished_requests():
        engine.step()
    sync()
    return 16 * (256 + 32) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on the CPU, bfloat16 on CUDA")
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--first", type=int, default=500, help="tokens of the first message")
    ap.add_argument("--message", type=int, default=450, help="tokens of each later user message")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--checkpoint", default=None, help="default: the 338M random checkpoint of common.py")
    args = ap.parse_args()
    path = args.checkpoint or bench_checkpoint()
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    engines = {name: LLMEngine.from_pretrained(path, device=args.device, dtype=dtype, max_num_seqs=8,
                                               max_model_len=8192, enable_prefix_caching=name == "on")
               for name in ("off", "on")}
    vocab = engines["on"].cfg.vocab_size
    for name, eng in engines.items():  # first calls build kernels and caches
        ttft(eng, "warm", rand_tokens(64, 99, vocab), 2)
    exact = dtype == "float32"
    if args.device == "cuda":  # a whole chat of other tokens first: Triton compiles a kernel per new specialisation
        chat(engines, args.turns, args.first, args.message, vocab, sync, exact, seed=1)
    rows = chat(engines, args.turns, args.first, args.message, vocab, sync, exact)
    best = {"off": 0.0, "on": 0.0}
    for r in range(args.rounds):
        for name in ("off", "on") if r % 2 == 0 else ("on", "off"):
            best[name] = max(best[name], throughput(engines[name], vocab, r, sync))
    print(f"\nprefix caching, {args.device}: {machine()}, commit {commit()}, {datetime.date.today()}\n"
          f"checkpoint {path} (random weights), dtype {dtype}, chunk {engines['on'].scheduler.chunk}; chat: first "
          f"message {args.first} tokens, then {args.message}-token messages after 32-token replies\n")
    print("| turn | prompt tokens | TTFT cache off (s) | TTFT cache on (s) | speedup | cached tokens | equal tokens |\n"
          "|---|---|---|---|---|---|---|")
    for turn, n, off, on, cached, equal in rows:
        print(f"| {turn} | {n} | {off:.3f} | {on:.3f} | {off / on:.1f}x | {cached} | {equal}/32 |")
    print(f"\nno shared prefixes (16 x 256 + 32 tokens, np 8, best of {args.rounds}): cache off {best['off']:.0f} "
          f"tok/s, on {best['on']:.0f} tok/s ({best['on'] / best['off']:.3f}x)")


if __name__ == "__main__":
    main()
