"""A multi-turn chat against llama.cpp's server on the same GGUF file (issue 18): time to first token per turn.

The random 338M Qwen3-Next checkpoint of benchmarks/common.py as the F32 GGUF file llama.cpp's own converter makes
(bench_cpu.gguf_files). deltaserve: `LLMEngine` on that file, prefix caching on (the default). llama.cpp:
`llama-server -np 1` on the same file with `cache_prompt` (its default), the same threads. The chat of
bench_prefix_cache.py: a first message, then turns that add the engine's own 32-token reply (ignore_eos, greedy)
and a new user message, so both see prompts of the same lengths. --branch: every request is the first message
followed by a new message alone (a shared document or system prompt with different questions, or a regenerated
turn; turn 1 is the first message alone). --shared: the same, but turn 1 too has its own message after the first
(a system prompt every request shares, which no request ends at). --conversations N: N such chats
(different first messages) take turns, one request each, on the same engine and the same one-slot server.
TTFT = request sent to the first token received (llama.cpp: the first streamed chunk). llama.cpp's
`timings.prompt_n` says how many prompt tokens it computed. Random weights: the speeds are real, the text is not.

Needs llama.cpp built by ../shared/tools/build-llama-cpp.sh (default ~/.cache/deltaserve-peer/llama.cpp).
Run: python benchmarks/bench_prefix_peer.py [--turns 8] [--first 500] [--message 450] [--branch | --shared]
     [--conversations 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import torch

from bench_cpu import REPO, gguf_files
from bench_prefix_cache import rand_tokens, ttft
from common import commit, machine
from deltaserve import LLMEngine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(llama: Path, path: Path, threads: int, ctx: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([str(llama / "build/bin/llama-server"), "-m", str(path), "-t", str(threads), "-c", str(ctx),
                             "-np", "1", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("llama-server did not start")


def peer_turn(url: str, prompt: list[int], n: int) -> tuple[float, list[int], int]:
    """(seconds to the first streamed token, the reply's token ids, prompt tokens llama.cpp computed)."""
    body = json.dumps({"prompt": prompt, "n_predict": n, "temperature": 0, "ignore_eos": True, "cache_prompt": True,
                       "stream": True, "return_tokens": True}).encode()
    req = urllib.request.Request(url + "/completion", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    first, tokens, computed = None, [], -1
    with urllib.request.urlopen(req) as r:
        for line in r:
            if not line.startswith(b"data: "):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("tokens") and first is None:
                first = time.perf_counter() - start
            tokens += chunk.get("tokens", [])
            if chunk.get("stop"):
                computed = chunk.get("timings", {}).get("prompt_n", -1)
    return first, tokens, computed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--first", type=int, default=500, help="tokens of the first message")
    ap.add_argument("--message", type=int, default=450, help="tokens of each later user message")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--branch", action="store_true", help="each request: the first message + a new message alone")
    ap.add_argument("--shared", action="store_true", help="as --branch, turn 1 included")
    ap.add_argument("--conversations", type=int, default=1, help="independent chats, taking turns one request each")
    ap.add_argument("--llama-cpp", type=Path, default=Path.home() / ".cache/deltaserve-peer/llama.cpp")
    ap.add_argument("--tools", type=Path, default=REPO.parent / "shared/tools", help="convert-to-gguf.py's folder")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = gguf_files(args.llama_cpp, args.tools, ["f32"])["f32"]
    ctx = args.first + args.turns * (args.message + 32) + 64
    engine = LLMEngine.from_pretrained(str(path), dtype="float32", max_num_seqs=4, max_model_len=ctx)
    vocab = engine.cfg.vocab_size
    proc, url = start_server(args.llama_cpp, path, args.threads, ctx)
    try:
        ttft(engine, "warm", rand_tokens(64, 99, vocab), 2)
        peer_turn(url, rand_tokens(64, 99, vocab), 2)
        first = [rand_tokens(args.first, 100 * c, vocab) for c in range(args.conversations)]
        opening = [f + rand_tokens(args.message, 100 * c, vocab) if args.shared else f for c, f in enumerate(first)]
        hists = [(o, o) for o in opening]  # (deltaserve's, llama.cpp's) history per conversation
        rows = []
        for t in range(args.turns):
            for c, (ours_hist, theirs_hist) in enumerate(hists):  # conversations take turns
                cached = engine.kv.stats.cached_tokens
                t_ours, out = ttft(engine, f"c{c}-turn{t}", ours_hist, 32)
                t_theirs, reply, computed = peer_turn(url, theirs_hist, 32)
                rows.append((c, t + 1, len(ours_hist), t_ours, engine.kv.stats.cached_tokens - cached, t_theirs,
                             computed))
                message = rand_tokens(args.message, 100 * c + t + 1, vocab)
                hists[c] = (first[c] + message,) * 2 if args.branch or args.shared else \
                    (ours_hist + out + message, theirs_hist + reply + message)
    finally:
        proc.kill()
    print(f"\nmulti-turn chat, deltaserve vs llama.cpp llama-server on {path.name}: {machine()}, commit {commit()}, "
          f"{datetime.date.today()}; first message {args.first} tokens, then {args.message}-token messages "
          f"{'each alone after the first message' if args.branch or args.shared else 'after 32-token replies'}"
          f"{' (turn 1 too)' if args.shared else ''}; random weights\n")
    print("| chat | turn | prompt tokens | deltaserve TTFT (s) | tokens from its cache | llama.cpp TTFT (s) | "
          "prompt tokens llama.cpp computed | llama.cpp / deltaserve |\n|---|---|---|---|---|---|---|---|")
    for c, turn, n, ours, cached, theirs, computed in rows:
        print(f"| {c} | {turn} | {n} | {ours:.3f} | {cached} | {theirs:.3f} | {computed} | {theirs / ours:.1f}x |")


if __name__ == "__main__":
    main()
