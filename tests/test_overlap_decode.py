"""Overlapped decoding (overlap_decode): step N+1 starts before the host reads step N's tokens.

On the CPU the launch is synchronous, but the engine's books are the same as on CUDA: a chained step
takes its input tokens from the previous step's tokens (argmax, or drawn with the uniform its sequence's
generator gave at launch), sequences that finish (stop token, length, abort) at step N still run in
N+1 and have that token dropped, and their slot is reused afterwards. Every test compares with the
step-by-step engine: the same tokens, seeded sampled ones included.
"""

import random

import pytest
import torch

from deltaserve import LLMEngine, SamplingParams
from deltaserve.weights.loader import load_model
from drive import drive


def make_engine(path, overlap: bool, max_num_seqs: int = 4, max_model_len: int = 96) -> LLMEngine:
    model, cfg = load_model(path, torch.float32, "cpu")
    return LLMEngine(model, cfg, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                     max_num_batched_tokens=32, overlap_decode=overlap)


def workload(vocab: int, seed: int, n: int) -> list:
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        sampling = [dict(temperature=0), dict(temperature=0), dict(temperature=0.8, seed=i),
                    dict(temperature=1.2, top_k=5, seed=i), dict(temperature=0.9, top_k=20, top_p=0.8, seed=i),
                    dict(temperature=0.7, top_p=0.7, seed=i)][i % 6]
        params = SamplingParams(max_tokens=rng.randint(3, 12), **sampling)
        requests.append((f"r{i}", prompt, params, rng.randint(0, 10), rng.randint(2, 8) if i % 5 == 4 else None))
    return requests


@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3_5"])
def test_overlapped_decode_gives_the_step_by_step_tokens(tiny_dirs, arch):
    requests = workload(256, seed=1, n=12)
    ref = drive(make_engine(tiny_dirs[arch], overlap=False), requests, keep_logits=False)
    eng = make_engine(tiny_dirs[arch], overlap=True)
    got = drive(eng, requests, keep_logits=False)
    assert eng.stats.overlapped_steps > 5  # the overlapped path did run
    for rid, _, _, _, abort in requests:
        if abort is None:
            assert got[rid] == ref[rid], rid
        else:  # where an abort lands depends on how many steps are in flight: a prefix of the same answer
            assert got[rid][0] == ref[rid][0][: len(got[rid][0])], rid
    assert eng.scheduler.slots.available == eng.cache.max_num_seqs and eng.in_flight is None


def test_stop_tokens_and_context_end_under_overlap(tiny_dirs):
    """A stop token met mid-run, and a sequence that runs to max_model_len, with the others still decoding;
    then their slots go to new requests while a step with the finished ones is still in flight."""
    path = tiny_dirs["qwen3_5"]
    ref_eng = make_engine(path, overlap=False, max_num_seqs=3, max_model_len=40)
    greedy = SamplingParams(max_tokens=20, temperature=0)
    probe = drive(ref_eng, [("probe", [5, 6, 7], greedy, 0, None)], keep_logits=False)["probe"][0]
    stop_at = probe[6]
    requests = [
        ("stop", [5, 6, 7], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_at]), 0, None),
        ("to-context-end", [9] * 30, SamplingParams(max_tokens=None, temperature=0), 0, None),
        ("long", [11, 12], SamplingParams(max_tokens=25, temperature=0), 0, None),
        ("late-1", [13, 14, 15], SamplingParams(max_tokens=6, temperature=0), 3, None),
        ("late-2", [16], SamplingParams(max_tokens=6, temperature=0), 4, None),
    ]
    ref = drive(ref_eng, requests, keep_logits=False)
    eng = make_engine(path, overlap=True, max_num_seqs=3, max_model_len=40)
    got = drive(eng, requests, keep_logits=False)
    assert eng.stats.overlapped_steps > 5
    assert got == ref
    assert got["stop"][2] == "stop" and got["stop"][0][-1] == stop_at and len(got["stop"][0]) <= 7
    assert got["to-context-end"][2] == "length" and len(got["to-context-end"][0]) == 10
