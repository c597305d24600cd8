"""`deltaserve bench`: a sweep-bench for hybrid models.

Depth sweep: at depth 0, ub, 2ub, ... < c, prompt-processing t/s of a ub-token chunk and
generation t/s of n tokens at that depth. Concurrency sweep: aggregate and per-sequence
generation t/s at np = 1, 2, 4, ... up to -np, plus a run whose busy slots are not consecutive.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from tqdm import tqdm

from .common import add_model_args, add_spec_arg, emit_json, make_engine
from .sweep import concurrency_sweep, decode, depth_sweep, spec_sweep


def register(sub) -> None:
    p = sub.add_parser("bench", help="sweep-bench: t/s against depth and against parallel sequences",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("-c", "--ctx-size", type=int, default=2048, help="deepest depth of the sweep (default 2048)")
    p.add_argument("-ub", "--ubatch-size", type=int, default=512, help="prompt chunk and depth step (default 512)")
    p.add_argument("-n", "--n-gen", type=int, default=32, help="tokens generated per measurement (default 32)")
    p.add_argument("-np", "--parallel", type=int, default=8, help="largest np of the concurrency sweep (default 8)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt per sequence in the concurrency sweep")
    p.add_argument("--plot", help="write a PNG of t/s against depth and against np (needs matplotlib)")
    add_spec_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    nps = [1 << i for i in range(args.parallel.bit_length()) if 1 << i <= args.parallel]
    engine = make_engine(args, max_num_seqs=max(nps), extra_state_slots=1, spec_tokens=args.spec_tokens,
                         max_model_len=max(args.ctx_size + args.n_gen, args.prompt_len + args.n_gen + 1),
                         max_num_batched_tokens=max(args.ubatch_size, args.prompt_len * max(nps)))
    decode(engine, [0], 0, 2, [0])  # warm-up: first-call costs stay out of the numbers
    steps = -(-args.ctx_size // args.ubatch_size) + len(nps) + 1 + (len(nps) if args.spec_tokens else 0)
    with tqdm(total=steps, file=sys.stderr, disable=args.json, desc="bench") as bar:
        depth = depth_sweep(engine, args.ctx_size, args.ubatch_size, args.n_gen, progress=bar.update)
        conc = concurrency_sweep(engine, nps, args.prompt_len, args.n_gen, progress=bar.update)
        spec = spec_sweep(engine, nps, args.prompt_len, args.n_gen, progress=bar.update) if args.spec_tokens else []
    result = {"model": args.model, "depth": [asdict(r) for r in depth],
              "concurrency": [{**asdict(r), "per_seq_tps": r.per_seq_tps} for r in conc],
              "speculative": {"spec_tokens": args.spec_tokens, "rows": [asdict(r) for r in spec]}}
    if args.plot:
        plot(result, args.plot)
    if args.json:
        emit_json(result)
        return 0
    print("| depth | PP tokens | PP t/s | TG tokens | TG t/s |\n|---|---|---|---|---|")
    for r in depth:
        print(f"| {r.depth} | {r.pp_tokens} | {r.pp_tps:.1f} | {r.tg_tokens} | {r.tg_tps:.2f} |")
    print("\n| np | slots | aggregate TG t/s | per-sequence t/s |\n|---|---|---|---|")
    for r in conc:
        print(f"| {r.np} | {','.join(map(str, r.slots))} | {r.aggregate_tps:.2f} | {r.per_seq_tps:.2f} |")
    if spec:
        print(f"\n| np | TG t/s with --spec-tokens {args.spec_tokens} (engine) | draft acceptance |\n|---|---|---|")
        for r in spec:
            print(f"| {r.np} | {r.aggregate_tps:.2f} | {r.acceptance:.0%} |")
    return 0


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("deltaserve: --plot needs matplotlib (pip install matplotlib)") from None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    d = result["depth"]
    a.plot([r["depth"] for r in d], [r["pp_tps"] for r in d], "o-", label="prompt processing")
    a.plot([r["depth"] for r in d], [r["tg_tps"] for r in d], "s-", label="generation")
    a.set(xlabel="depth (tokens)", ylabel="tokens/s", title="t/s against depth", yscale="log")
    a.legend()
    c = [r for r in result["concurrency"] if r["slots"] == list(range(r["np"]))]
    b.plot([r["np"] for r in c], [r["aggregate_tps"] for r in c], "o-", label="aggregate")
    b.plot([r["np"] for r in c], [r["per_seq_tps"] for r in c], "s-", label="per sequence")
    b.set(xlabel="parallel sequences (np)", ylabel="generation tokens/s", title="t/s against np")
    b.set_xscale("log", base=2)
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
