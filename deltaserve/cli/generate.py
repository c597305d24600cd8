"""`deltaserve generate`: stream a completion, or run -np sequences concurrently and print each."""

from __future__ import annotations

import argparse
import sys
import time

from tqdm import tqdm

from ..sampling.params import SamplingParams
from .common import add_model_args, add_spec_arg, emit_json, make_engine, prompt_tokens


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate from a prompt. With -np N, N sequences run concurrently.")
    add_model_args(p)
    p.add_argument("-p", "--prompt", help="prompt text")
    p.add_argument("-f", "--file", help="read the prompt from this file")
    p.add_argument("--prompt-ids", help="prompt as comma-separated token ids (models without a tokenizer)")
    p.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("-np", "--parallel", type=int, default=1, help="sequences to run concurrently (default 1)")
    p.add_argument("-c", "--ctx-size", type=int, default=4096, help="context length per sequence (default 4096)")
    p.add_argument("-ub", "--ubatch-size", type=int, default=512, help="tokens per engine step (default 512)")
    p.add_argument("--temp", type=float, default=0.8, help="temperature, 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="top-k, 0 = off (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p (default 0.95)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed; sequence i uses seed + i")
    add_spec_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # one prompt, its sequences admitted together: a prefix cache could never hit, its snapshot slots would only
    # take memory (8 x 6 MB of states for the 338M checkpoint)
    engine = make_engine(args, max_num_seqs=args.parallel, max_model_len=args.ctx_size,
                         max_num_batched_tokens=args.ubatch_size, spec_tokens=args.spec_tokens,
                         enable_prefix_caching=False)
    prompt = prompt_tokens(args, engine)
    for i in range(args.parallel):
        seed = None if args.seed is None else args.seed + i
        params = SamplingParams(max_tokens=args.n_predict, temperature=args.temp, top_k=args.top_k,
                                top_p=args.top_p, seed=seed)
        engine.add_request(str(i), prompt, params)
    stream = args.parallel == 1 and not args.json
    decode = engine.tokenizer.decode if engine.tokenizer else (lambda ids: " ".join(map(str, ids)) + " ")
    shown, results, first_token_at = "", {}, None
    bar = tqdm(total=args.parallel * args.n_predict, unit="tok", disable=stream or args.json, file=sys.stderr)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            first_token_at = first_token_at or time.perf_counter()
            bar.update(len(out.new_token_ids))
            if stream:  # print the new text; hold back an incomplete multi-byte character
                text = decode(out.token_ids)
                if not text.endswith("\ufffd"):
                    sys.stdout.write(text[len(shown):])
                    sys.stdout.flush()
                    shown = text
            if out.finished:
                results[int(out.request_id)] = out
    bar.close()
    end = time.perf_counter()
    generated = sum(len(o.token_ids) for o in results.values())
    timing = {"prompt_tokens": len(prompt) * args.parallel, "generated_tokens": generated,
              "prompt_seconds": (first_token_at or end) - start, "generation_seconds": end - (first_token_at or end)}
    timing["generation_tokens_per_second"] = (generated - len(results)) / max(timing["generation_seconds"], 1e-9)
    drafted = sum(o.num_draft_tokens for o in results.values())
    if drafted:
        timing["spec_acceptance_rate"] = sum(o.num_accepted_tokens for o in results.values()) / drafted
    outs = [results[i] for i in range(args.parallel)]
    if args.json:
        emit_json({"outputs": [{"index": i, "text": decode(o.token_ids) if engine.tokenizer else None,
                                "token_ids": o.token_ids, "finish_reason": o.finish_reason}
                               for i, o in enumerate(outs)], "timing": timing})
        return 0
    if stream:
        sys.stdout.write(decode(outs[0].token_ids)[len(shown):] + "\n")
    else:
        for i, o in enumerate(outs):
            print(f"--- sequence {i} ({o.finish_reason}) ---\n{decode(o.token_ids)}")
    spec = f", {timing['spec_acceptance_rate']:.0%} of drafts accepted" if drafted else ""
    print(f"[{generated} tokens, {timing['generation_tokens_per_second']:.1f} t/s generation{spec}]", file=sys.stderr)
    return 0
