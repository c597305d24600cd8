"""`deltaserve check`: the concurrency harness users run against their own model.

For each np: (1) np identical greedy prompts must give one distinct answer; (2) np distinct
prompts, each carrying a unique marker, must each give exactly the tokens of its solo run.
Arrivals are staggered so prefills and decodes share steps. Exits 1 and names the sequences
that differ.
"""

from __future__ import annotations

import argparse
import random
import sys
from typing import Callable

from tqdm import tqdm

from ..engine.llm_engine import LLMEngine
from ..sampling.params import SamplingParams
from .common import add_model_args, emit_json, make_engine

MARKERS = ["ALPHA", "BRAVO", "CHARLIE", "DELTA", "ECHO", "FOXTROT", "GOLF", "HOTEL", "INDIA", "JULIET",
           "KILO", "LIMA", "MIKE", "NOVEMBER", "OSCAR", "PAPA"]


def register(sub) -> None:
    p = sub.add_parser("check", help="concurrency harness: every sequence must match its solo run",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--np", default="1,2,3,4,6,8,16", help="comma-separated parallel counts (default 1,2,3,4,6,8,16)")
    p.add_argument("-n", "--n-predict", type=int, default=32, help="greedy tokens per sequence (default 32)")
    p.set_defaults(func=run)


def prompts(engine: LLMEngine, count: int) -> list[list[int]]:
    """Distinct prompts of different lengths, each with a unique marker."""
    if engine.tokenizer is not None:
        texts = [f"Codeword {MARKERS[i % 16]}-{i:03d}. " + "Remember it. " * (i % 5) + "The codeword is"
                 for i in range(count)]
        return [engine.tokenizer.encode(t) for t in texts]
    rng = random.Random(0)
    return [[rng.randrange(engine.cfg.vocab_size) for _ in range(5 + 3 * (i % 7))] for i in range(count)]


def generate(engine: LLMEngine, batch: list[list[int]], n: int, tag: str) -> list[list[int]]:
    """Greedy, all prompts concurrently, request i arriving at step i // 2."""
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    pending, results, step = list(enumerate(batch)), {}, 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] // 2 <= step:
            i, prompt = pending.pop(0)
            engine.add_request(f"{tag}-{i}", prompt, params)
        results.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        step += 1
    return [results[f"{tag}-{i}"] for i in range(len(batch))]


def run_check(make: Callable[[int], LLMEngine], nps: list[int], n: int, progress=None) -> list[dict]:
    """Returns one report per np: {'np', 'identical_distinct', 'mismatched': [sequence indices]}."""
    reports = []
    for np_ in nps:
        engine = make(np_)
        same = generate(engine, prompts(engine, 1) * np_, n, "same")
        distinct = prompts(engine, np_)
        solo = [generate(engine, [p], n, f"solo{i}")[0] for i, p in enumerate(distinct)]
        together = generate(engine, distinct, n, "together")
        mismatched = [i for i, (a, b) in enumerate(zip(solo, together)) if a != b]
        reports.append({"np": np_, "identical_distinct": len({tuple(t) for t in same}), "mismatched": mismatched,
                        "markers": [MARKERS[i % 16] + f"-{i:03d}" for i in mismatched]})
        if progress:
            progress()
    return reports


def run(args: argparse.Namespace) -> int:
    nps = [int(x) for x in args.np.split(",")]
    with tqdm(total=len(nps), file=sys.stderr, disable=args.json, desc="check") as bar:
        reports = run_check(lambda np_: make_engine(args, max_num_seqs=np_, max_model_len=1024), nps,
                            args.n_predict, progress=bar.update)
    ok = all(r["identical_distinct"] == 1 and not r["mismatched"] for r in reports)
    if args.json:
        emit_json({"ok": ok, "reports": reports})
    else:
        for r in reports:
            status = "CLEAN" if r["identical_distinct"] == 1 and not r["mismatched"] else "DIRTY"
            detail = "" if not r["mismatched"] else f"; differ from solo: sequences {r['mismatched']} ({', '.join(r['markers'])})"
            print(f"np={r['np']:3d} {status}: identical prompts gave {r['identical_distinct']} distinct answer(s){detail}")
    return 0 if ok else 1
