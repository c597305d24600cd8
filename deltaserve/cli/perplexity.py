"""`deltaserve perplexity`: llama-perplexity semantics on the engine.

The text is cut into chunks of c tokens; b/c chunks run as parallel sequences sharing every step
(micro-batches of ub tokens); in each chunk the second half is scored: the logits at position j
predict token j+1 for j in [c/2, c-1).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ..sampling.params import SamplingParams
from .common import add_model_args, emit_json, make_engine, parse_ids


def register(sub) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a text file (llama-perplexity semantics)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("-f", "--file", required=True, help="text file to score (token ids with --ids)")
    p.add_argument("--ids", action="store_true", help="the file holds comma-separated token ids, not text")
    p.add_argument("-c", "--ctx-size", type=int, default=512, help="chunk length in tokens (default 512)")
    p.add_argument("-b", "--batch-size", type=int, default=2048,
                   help="tokens per logical batch: b/c chunks run as parallel sequences (default 2048)")
    p.add_argument("-ub", "--ubatch-size", type=int, default=512, help="tokens per engine step (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="score at most this many chunks")
    p.set_defaults(func=run)


def chunk_logprobs(logits: torch.Tensor, chunk: list[int], first: int) -> torch.Tensor:
    """logits [c - first, V] of positions first..c-1 -> log p(token j+1) for j in [first, c-1)."""
    targets = torch.tensor(chunk[first + 1:])
    return logits[:-1].log_softmax(-1).gather(1, targets[:, None])[:, 0]


def run(args: argparse.Namespace) -> int:
    c = args.ctx_size
    n_seq = max(1, args.batch_size // c)
    engine = make_engine(args, max_num_seqs=n_seq, max_model_len=c, max_num_batched_tokens=args.ubatch_size)
    text = Path(args.file).read_text()
    if args.ids:
        tokens = parse_ids(text)
    elif engine.tokenizer is None:
        raise SystemExit("deltaserve: this model has no tokenizer.json; pass a file of token ids with --ids")
    else:
        tokens = engine.tokenizer.encode(text)
    n_chunks = len(tokens) // c if args.chunks is None else min(args.chunks, len(tokens) // c)
    if n_chunks < 1 or c < 4:
        raise SystemExit(f"deltaserve: need at least one chunk of {c} tokens (c >= 4); the file has {len(tokens)}")
    first = c // 2
    say = (lambda *a, **k: None) if args.json else print
    say(f"perplexity: {len(tokens)} tokens, {n_chunks} chunks of {c}, {n_seq} sequences per batch, ub {args.ubatch_size}",
        file=sys.stderr)
    logprobs: list[torch.Tensor] = []
    bar = tqdm(total=n_chunks, unit="chunk", file=sys.stderr, disable=args.json)
    for group in range(0, n_chunks, n_seq):
        chunks = {str(i): tokens[i * c:(i + 1) * c] for i in range(group, min(group + n_seq, n_chunks))}
        for rid, chunk in chunks.items():
            engine.add_request(rid, chunk, SamplingParams(max_tokens=0), prompt_logits_from=first)
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o for o in engine.step() if o.finished})
        for rid, chunk in chunks.items():
            logprobs.append(chunk_logprobs(done[rid].prompt_logits, chunk, first))
            nll = -torch.cat(logprobs).double()
            say(f"[{int(rid) + 1}]{math.exp(nll.mean()):.4f},", end="", flush=True)
        bar.update(len(chunks))
    bar.close()
    nll = -torch.cat(logprobs).double()
    mean, count = float(nll.mean()), nll.numel()
    ppl = math.exp(mean)
    unc = ppl * math.sqrt(max(float((nll ** 2).mean()) - mean ** 2, 0.0) / max(count - 1, 1))
    if args.json:
        emit_json({"ppl": ppl, "ppl_uncertainty": unc, "n_ctx": c, "n_seq": n_seq, "n_chunks": n_chunks,
                   "n_tokens_scored": count, "token_logprobs": torch.cat(logprobs).tolist()})
    else:
        print(f"\nFinal estimate: PPL = {ppl:.4f} +/- {unc:.5f}")
    return 0
