"""deltaserve against HF transformers on CPU, same weights, same run (issue 9).

Random Qwen3-Next checkpoint of 338M parameters (benchmarks/common.py), float32, prompt 128,
32 new tokens: prefill t/s, decode t/s with 1 and with 8 sequences, ratios to HF, and the
decode step's bandwidth roofline (bytes one step must read / copy bandwidth measured here).

Run: python benchmarks/bench_cpu.py [--tokens 32] [--rounds 3] [--threads 2] [--base REV]
--base REV also runs deltaserve as of git revision REV (exported to /tmp) in every round: the
before/after ratio of a change under the same machine noise. Both deltaserve versions then run in
child processes, so that neither inherits the other's process state.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from common import BENCH_CONFIG, bench_checkpoint, commit, machine, timed
from deltaserve import LLMEngine, SamplingParams
from deltaserve.engine.batch import Segment

PROMPT = 128


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, BENCH_CONFIG["vocab_size"], (n, PROMPT), generator=g).tolist()


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large copy."""
    src, dst = torch.randn(64 << 20), torch.empty(64 << 20)
    dst.copy_(src)
    return 2 * src.numel() * 4 * 5 / timed(lambda: [dst.copy_(src) for _ in range(5)])


def decode_bytes(cfg: dict, np_: int = 1) -> int:
    """Bytes one decode step must read at np=1: weights it touches (top-k experts only) + recurrent state."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(Qwen3NextConfig(**cfg))
    total = expert = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            continue  # one row is read
        total += p.numel()
        if ".experts." in name:
            expert += p.numel()
    touched = total - expert + expert * cfg["num_experts_per_tok"] / cfg["num_experts"]
    n_gdn = sum(1 for i in range(cfg["num_hidden_layers"]) if (i + 1) % 4)
    state = n_gdn * cfg["linear_num_value_heads"] * cfg["linear_key_head_dim"] * cfg["linear_value_head_dim"]
    return int(4 * (touched + 2 * state * np_))  # state is read and written


def hf_numbers(path, tokens: int) -> dict:
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        ids = torch.tensor(prompts(1))
        hf(ids)  # warm-up
        out["prefill"] = PROMPT / timed(lambda: hf(ids))
        for np_ in (1, 8):
            ids = torch.tensor(prompts(np_))
            res = hf(ids, use_cache=True)
            nxt = res.logits[:, -1:].argmax(-1)

            def loop():
                nonlocal res, nxt
                for _ in range(tokens):
                    res = hf(nxt, cache=res.cache, use_cache=True)
                    nxt = res.logits[:, -1:].argmax(-1)

            out[f"decode{np_}"] = np_ * tokens / timed(loop)
    return out


def ours(path, tokens: int) -> dict:
    engine = LLMEngine.from_pretrained(path, dtype="float32", max_num_seqs=8, max_model_len=512)
    run = engine.runner.run
    out = {}
    run([Segment(prompts(1)[0], 0, 0)])  # warm-up
    out["prefill"] = PROMPT / timed(lambda: run([Segment(prompts(1)[0], 0, 0)]))
    for np_ in (1, 8):
        params = SamplingParams(max_tokens=tokens + 1, temperature=0, ignore_eos=True)
        for i, p in enumerate(prompts(np_)):
            engine.add_request(f"{np_}-{i}", p, params)
        while engine.scheduler.waiting or any(not s.output_ids for s in engine.scheduler.running):
            engine.step()  # prefill and first token
        out[f"decode{np_}"] = np_ * tokens / timed(lambda: [engine.step() for _ in range(tokens)])
        assert not engine.has_unfinished_requests()
    return out


def child_numbers(rev: str | None, path: Path, tokens: int, threads: int) -> dict:
    """`ours` in a child process, with deltaserve as of git revision rev (None: this tree)."""
    tree = repo = Path(__file__).resolve().parent.parent
    if rev:  # by commit hash (HEAD means another commit tomorrow); from the repo root (else git archives a subtree)
        rev = subprocess.run(["git", "rev-parse", rev], cwd=repo, capture_output=True, text=True,
                             check=True).stdout.strip()
        tree = Path(f"/tmp/deltaserve-base-{rev}")
        if not tree.exists():
            tree.mkdir()
            archive = subprocess.run(["git", "archive", rev], cwd=repo, capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    cmd = [sys.executable, __file__, "--child", str(path), "--tokens", str(tokens), "--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.splitlines()[-1])
    assert result.pop("module").startswith(str(tree)), "the child imported the wrong deltaserve"
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both (0 = torch's default)")
    ap.add_argument("--base", help="also run deltaserve as of this git revision")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # checkpoint path: run `ours` only, print JSON
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        import deltaserve
        print(json.dumps({**ours(Path(args.child), args.tokens), "module": deltaserve.__file__}))
        return
    path = bench_checkpoint()
    rows = {"deltaserve": [], "HF transformers": []} | ({f"deltaserve {args.base}": []} if args.base else {})
    bws = []
    for i in range(args.rounds):  # alternate, so all see the same machine noise
        if args.base:
            for rev in (None, args.base)[::1 if i % 2 else -1]:  # and alternate which runs first
                rows[f"deltaserve {rev}" if rev else "deltaserve"].append(
                    child_numbers(rev, path, args.tokens, args.threads))
        else:
            rows["deltaserve"].append(ours(path, args.tokens))
        rows["HF transformers"].append(hf_numbers(path, args.tokens))
        bws.append(copy_bandwidth())
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in rows.items()}
    bw, step_bytes = statistics.median(bws), decode_bytes(BENCH_CONFIG)
    roof = bw / step_bytes
    print(f"# {machine()} | commit {commit()} | {datetime.date.today()} | random Qwen3-Next 338M, F32, "
          f"prompt {PROMPT}, {args.tokens} new tokens, median of {args.rounds}")
    print(f"# copy bandwidth {bw / 1e9:.1f} GB/s (median; per round {', '.join(f'{b / 1e9:.1f}' for b in bws)}); decode step reads {step_bytes / 1e6:.0f} MB -> roofline {roof:.1f} t/s")
    print("\n| | prefill t/s | decode t/s, 1 sequence | decode t/s, 8 sequences |\n|---|---|---|---|")
    for name, m in med.items():
        print(f"| {name} | {m['prefill']:.1f} | {m['decode1']:.2f} | {m['decode8']:.2f} |")
    o, h = med["deltaserve"], med["HF transformers"]
    print(f"| deltaserve / HF | {o['prefill'] / h['prefill']:.2f}x | {o['decode1'] / h['decode1']:.2f}x | "
          f"{o['decode8'] / h['decode8']:.2f}x |")
    print(f"| deltaserve / roofline (np=1) | | {o['decode1'] / roof:.2f} | |")
    if args.base:
        b = med[f"deltaserve {args.base}"]
        print(f"| deltaserve / deltaserve {args.base} | {o['prefill'] / b['prefill']:.2f}x | "
              f"{o['decode1'] / b['decode1']:.2f}x | {o['decode8'] / b['decode8']:.2f}x |")


if __name__ == "__main__":
    main()
