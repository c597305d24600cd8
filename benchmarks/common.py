"""Shared benchmark helpers: the issue-9 size random Qwen3-Next checkpoint, machine/commit lines, timing, time to
first token through an engine."""

from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path

import torch

from deltaserve import SamplingParams

# Qwen3-Next, 338M parameters: hidden 1024, 8 layers (3:1), GDN 8 QK / 16 V heads of 128,
# attention 8 Q / 2 KV heads of 128, 32 experts top-4 of width 256, shared expert 512, vocab 32000
BENCH_CONFIG = dict(
    vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
    head_dim=128, linear_num_key_heads=8, linear_num_value_heads=16, linear_key_head_dim=128,
    linear_value_head_dim=128, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=256,
    shared_expert_intermediate_size=512, intermediate_size=2048, max_position_embeddings=8192,
)


def bench_checkpoint(root: str = "/tmp/deltaserve-bench") -> Path:
    """Builds (once, seeded) and returns the benchmark checkpoint directory. Needs transformers."""
    path = Path(root) / "qwen3next-338m"
    if not (path / "config.json").is_file():
        from transformers import Qwen3NextConfig, Qwen3NextForCausalLM
        torch.manual_seed(0)
        Qwen3NextForCausalLM(Qwen3NextConfig(**BENCH_CONFIG)).save_pretrained(path)
    return path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    return torch.randint(vocab, (n, length), generator=torch.Generator().manual_seed(seed)).tolist()


def ttft(engine, prompt: list[int], tag: str) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.add_request(tag, prompt, SamplingParams(max_tokens=1, temperature=0))
    while not any(o.token_ids for o in engine.step()):
        pass
    return time.perf_counter() - start


def batch_time(engine, batch: list[list[int]], tag: str) -> float:
    """Seconds from adding every prompt to every first token (max_tokens=1)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i, p in enumerate(batch):
        engine.add_request(f"{tag}-{i}", p, SamplingParams(max_tokens=1, temperature=0))
    while engine.has_unfinished_requests():
        engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - start
