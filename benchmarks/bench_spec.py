"""Generation speed and acceptance with and without MTP speculative decoding (issue 5).

The embedded default model (trained, with an MTP head), greedy, np = 1, 4, 16 sequences with
different prompts, spec_tokens k = 0 (off), 1, 2, 3. Each configuration runs --rounds times,
alternating, and the median is reported.

Run: python benchmarks/bench_spec.py [--tokens 64] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

from common import commit, machine
from deltaserve import LLMEngine, SamplingParams
from deltaserve.models import DEFAULT_MODEL

PROMPTS = ["def quicksort(", "import os\n", "class Node:\n    def __init__(self", "for i in range(",
           "    return self.", "if __name__ == ", "with open(", "try:\n    import "]


def generate(engine: LLMEngine, np_: int, tokens: int) -> tuple[float, float, list[list[int]]]:
    """Returns (generated tokens/s after the first token, acceptance rate, outputs)."""
    tok = engine.tokenizer
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    for i in range(np_):
        engine.add_request(str(i), tok.encode(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS))), params)
    drafted0, accepted0 = engine.stats.draft_tokens, engine.stats.accepted_tokens
    outs, first = {}, None
    while engine.has_unfinished_requests():
        for o in engine.step():
            first = first or time.perf_counter()
            if o.finished:
                outs[int(o.request_id)] = o.token_ids
    seconds = time.perf_counter() - first
    drafted = engine.stats.draft_tokens - drafted0
    rate = (engine.stats.accepted_tokens - accepted0) / drafted if drafted else float("nan")
    return np_ * (tokens - 1) / seconds, rate, [outs[i] for i in range(np_)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engines = {k: LLMEngine.from_pretrained(DEFAULT_MODEL, dtype="float32", max_num_seqs=16, max_model_len=512,
                                            spec_tokens=k) for k in (0, 1, 2, 3)}
    print(f"# {machine()} | commit {commit()} | {datetime.date.today()} | embedded default model, greedy, "
          f"{args.tokens} tokens per sequence, median of {args.rounds}")
    print("\n| np | k | generation t/s | vs k=0 | acceptance | output identical to k=0 |\n|---|---|---|---|---|---|")
    for np_ in (1, 4, 16):
        runs = {k: [] for k in engines}
        for _ in range(args.rounds):
            for k, eng in engines.items():
                runs[k].append(generate(eng, np_, args.tokens))
        base = statistics.median(r[0] for r in runs[0])
        for k, rs in runs.items():
            tps = statistics.median(r[0] for r in rs)
            same = all(r[2] == runs[0][0][2] for r in rs)
            acc = "-" if k == 0 else f"{statistics.median(r[1] for r in rs):.0%}"
            print(f"| {np_} | {k} | {tps:.1f} | {tps / base:.2f}x | {acc} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
