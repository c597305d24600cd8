"""Tensor parallelism on several GPUs (issue 19): NCCL, rank r on GPU r, CUDA graphs per rank. TP=2 against TP=1
on the tiny fixtures of all three families (float32: prompt logits within 1e-5, greedy tokens identical with 16
sequences at once), and on a block-FP8 checkpoint whose ranks keep their FP8 shards. Skips with fewer than 2 GPUs
(the lent machines have had one so far: written, not yet run)."""

import pytest
import torch

if torch.cuda.device_count() < 2:
    pytest.skip("needs 2 CUDA devices", allow_module_level=True)

from deltaserve import LLMEngine  # noqa: E402
from deltaserve.kernels.gpu_quant import PlanarWeight  # noqa: E402
from deltaserve.weights.fp8 import write_fp8_checkpoint  # noqa: E402
from drive import greedy_random, prompt_logits  # noqa: E402
from tiny_models import ARCHS  # noqa: E402

KW = dict(device="cuda", dtype="float32", max_model_len=128, max_num_batched_tokens=64, max_num_seqs=16)
PROMPTS = [list(range(3, 43)), [7, 9, 11], list(range(100, 160, 3))]


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_matches_tp1_on_two_gpus(tiny_dirs, arch, check):
    one = LLMEngine.from_pretrained(tiny_dirs[arch], **KW)
    two = LLMEngine.from_pretrained(tiny_dirs[arch], tensor_parallel_size=2, **KW)
    for i, (got, want) in enumerate(zip(prompt_logits(two, PROMPTS), prompt_logits(one, PROMPTS))):
        check(f"tp2 {arch} prompt {i}", got, want, 1e-5)
    assert greedy_random(two, 16) == greedy_random(one, 16)
    assert two.stats.max_batch_seqs >= 8


def test_tp2_keeps_fp8_shards(tiny_dirs, tmp_path, check):
    path = write_fp8_checkpoint(tiny_dirs["qwen3_next"], tmp_path / "fp8")
    one = LLMEngine.from_pretrained(path, **KW)
    two = LLMEngine.from_pretrained(path, tensor_parallel_size=2, **KW)
    assert isinstance(two.runner.model.layers[0].mixer.in_proj.weight, PlanarWeight)
    for i, (got, want) in enumerate(zip(prompt_logits(two, PROMPTS), prompt_logits(one, PROMPTS))):
        check(f"tp2 fp8 prompt {i}", got, want, 1e-4)
