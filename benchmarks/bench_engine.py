"""Engine overhead and multi-sequence decode speed on CPU (issue 2).

1. Decode at np=1: the engine (scheduler, batch building, sampling) against a plain single-sequence
   loop over the same model code (ModelRunner + argmax), alternated A/B to share machine noise.
2. Aggregate decode tokens/s at np = 1, 4, 16.
3. Two busy slots: {0, 1} against {0, 2} (llama.cpp slowed 4x when busy slots were not consecutive).
4. Sampled decode (temperature; top-k + top-p) against greedy at np = 1 and 8: what sampling adds to a step.

Run: python benchmarks/bench_engine.py [--tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

from common import bench_checkpoint, commit, machine, timed
from deltaserve import LLMEngine, SamplingParams
from deltaserve.forward_batch import Segment

PROMPT = list(range(100, 228))  # 128 tokens


SAMPLED = {"greedy": dict(temperature=0), "temperature 0.7": dict(temperature=0.7),
           "top-k 20, top-p 0.8": dict(temperature=0.7, top_k=20, top_p=0.8)}


def engine_decode(engine: LLMEngine, np_: int, tokens: int, kind: str = "greedy") -> float:
    """Aggregate decode tokens/s of np sequences (prefill excluded), sampled as SAMPLED[kind] says."""
    for i in range(np_):
        params = SamplingParams(max_tokens=tokens + 1, ignore_eos=True, seed=i, **SAMPLED[kind])
        engine.add_request(f"r{i}", PROMPT[i:] + PROMPT[:i], params)
    while any(s.in_prefill or not s.output_ids for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill, and the first token
    seconds = timed(lambda: [engine.step() for _ in range(tokens)])
    assert not engine.has_unfinished_requests()
    return np_ * tokens / seconds


def engine_overhead(engine: LLMEngine, tokens: int) -> tuple[float, float]:
    """(ms per engine decode step, ms of it spent outside ModelRunner.run) at np=1: the engine's own cost."""
    run, inside = engine.runner.run, [0.0]

    def timed_run(*args, **kwargs):
        t0 = time.perf_counter()
        out = run(*args, **kwargs)
        inside[0] += time.perf_counter() - t0
        return out

    engine.add_request("overhead", PROMPT, SamplingParams(max_tokens=tokens + 1, temperature=0, ignore_eos=True))
    while not engine.scheduler.running or not engine.scheduler.running[0].output_ids:
        engine.step()  # prefill and the first token
    engine.runner.run = timed_run
    try:
        total = timed(lambda: [engine.step() for _ in range(tokens)])
    finally:
        engine.runner.run = run
    return 1e3 * total / tokens, 1e3 * (total - inside[0]) / tokens


def plain_decode(engine: LLMEngine, slots: list[int], tokens: int) -> float:
    """The same model code without the engine: one segment per slot, greedy argmax, in a loop."""
    run = engine.runner.run
    last = [int(lg[-1].argmax()) for lg in run([Segment(PROMPT, 0, s) for s in slots])]
    pos = len(PROMPT)

    def loop():
        nonlocal last, pos
        for _ in range(tokens):
            logits = run([Segment([t], pos, s) for t, s in zip(last, slots)])
            last = [int(lg[-1].argmax()) for lg in logits]
            pos += 1

    return len(slots) * tokens / timed(loop)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    engine = LLMEngine.from_pretrained(bench_checkpoint(), dtype="float32", max_num_seqs=16, max_model_len=512)
    print(f"# {machine()} | commit {commit()} | {datetime.date.today()} | model: random Qwen3-Next 338M, F32")
    print(f"# cache: {engine.memory_report()}")
    engine_decode(engine, 1, 4)  # warm-up

    eng, plain = [], []
    for _ in range(args.rounds):
        eng.append(engine_decode(engine, 1, args.tokens))
        plain.append(plain_decode(engine, [0], args.tokens))
    e, p = statistics.median(eng), statistics.median(plain)
    step_ms, outside_ms = engine_overhead(engine, args.tokens)
    print("\n| np=1 decode | t/s (median of %d) |" % args.rounds)
    print("|---|---|")
    print(f"| plain single-sequence loop | {p:.2f} |")
    print(f"| engine (LLMEngine.step) | {e:.2f} |")
    print(f"| engine / plain | {e / p:.3f} |")
    print(f"| engine time outside the model runner | {outside_ms * 1e3:.0f} us of a {step_ms:.1f} ms step "
          f"({outside_ms / step_ms:.2%}) |")

    print("\n| np | aggregate decode t/s | per-sequence t/s |")
    print("|---|---|---|")
    for np_ in (1, 4, 16):
        tps = engine_decode(engine, np_, args.tokens)
        print(f"| {np_} | {tps:.2f} | {tps / np_:.2f} |")

    rows = {}
    for _ in range(args.rounds):
        for name, slots in (("{0, 1}", [0, 1]), ("{0, 2}", [0, 2])):
            rows.setdefault(name, []).append(plain_decode(engine, slots, args.tokens))
    print("\n| busy slots | aggregate decode t/s |")
    print("|---|---|")
    for name, vals in rows.items():
        print(f"| {name} | {statistics.median(vals):.2f} |")
    print(f"| {{0, 2}} / {{0, 1}} | {statistics.median(rows['{0, 2}']) / statistics.median(rows['{0, 1}']):.3f} |")

    print("\n| np | sampling | aggregate decode t/s (median of %d) | / greedy |" % args.rounds)
    print("|---|---|---|---|")
    for np_ in (1, 8):
        tps = {kind: statistics.median(engine_decode(engine, np_, args.tokens, kind) for _ in range(args.rounds))
               for kind in SAMPLED}
        for kind, v in tps.items():
            print(f"| {np_} | {kind} | {v:.2f} | {v / tps['greedy']:.3f} |")


if __name__ == "__main__":
    main()
