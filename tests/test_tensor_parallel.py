"""Tensor parallelism on the CPU (issue 19): TP=2 over gloo, real worker processes, against TP=1 on the tiny
fixtures of all three families: prompt logits within 1e-5, greedy tokens identical with 16 sequences at once and
with MTP speculative decoding; the sharding rules without processes; sizes that do not divide fail alone."""

from __future__ import annotations

import pytest
import torch

from deltaserve import LLMEngine, SamplingParams
from deltaserve.config import ModelConfig
from deltaserve.forward_batch import BatchError, Segment
from deltaserve.parallel.shard import ShardError, _kv_heads, shard_config, shard_param
from deltaserve.weights.hf_layout import hf_recipes
from deltaserve.weights.loader import open_checkpoint
from deltaserve.weights.shard_read import read_shard
from drive import greedy_random, prompt_logits
from tiny_models import ARCHS, add_mtp_weights, save_hf_model

KW = dict(dtype="float32", max_model_len=128, max_num_batched_tokens=64)
PROMPTS = [list(range(3, 43)), [7, 9, 11], list(range(100, 160, 3))]


def test_shard_config_divides_heads_and_widths(tiny_dirs):
    cfg = ModelConfig.from_dir(tiny_dirs["qwen3_5_moe"])
    local = shard_config(cfg, 2)
    assert (local.num_k_heads, local.num_v_heads, local.num_heads, local.num_kv_heads) == (1, 2, 2, 1)
    assert local.moe_intermediate_size == cfg.moe_intermediate_size // 2 and local.num_experts == cfg.num_experts
    with pytest.raises(ShardError, match="tensor_parallel_size 3 must divide linear_num_key_heads 2"):
        shard_config(cfg, 3)
    with pytest.raises(ShardError, match="tensor_parallel_size 3"):
        LLMEngine.from_pretrained(tiny_dirs["qwen3_5_moe"], tensor_parallel_size=3, **KW)  # before any process


def test_kv_heads_replicate_beyond_their_count():
    rows = torch.arange(2 * 3).view(2 * 3, 1)  # 2 KV heads of 3 rows
    assert [_kv_heads(rows, 2, r, 4)[:, 0].tolist() for r in range(4)] == [[0, 1, 2]] * 2 + [[3, 4, 5]] * 2
    assert [_kv_heads(rows, 2, r, 2)[:, 0].tolist() for r in range(2)] == [[0, 1, 2], [3, 4, 5]]


def fused_experts(src, dst):
    """A copy of a MoE checkpoint with its experts stored fused ([E, 2I, D] gate_up, [E, D, I] down), as
    transformers' newer MoE checkpoints store them."""
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    t = load_file(str(dst / "model.safetensors"))
    for layer in sorted({n.split(".experts.")[0] for n in t if ".experts." in n}):
        e = len({n for n in t if n.startswith(layer + ".experts.") and n.endswith("down_proj.weight")})
        pop = t.pop
        t[layer + ".experts.gate_up_proj"] = torch.stack(
            [torch.cat([pop(f"{layer}.experts.{x}.{p}_proj.weight") for p in ("gate", "up")]) for x in range(e)])
        t[layer + ".experts.down_proj"] = torch.stack([t.pop(f"{layer}.experts.{x}.down_proj.weight") for x in range(e)])
    save_file(t, str(dst / "model.safetensors"))
    return dst


def test_each_rank_reads_exactly_its_shard(tiny_dirs, tmp_path):
    """weights/shard_read.py (runs of rows, column ranges) against cutting the fully read parameter."""
    for path in [*tiny_dirs.values(), fused_experts(tiny_dirs["qwen3_5_moe"], tmp_path / "fused")]:
        ckpt, cfg = open_checkpoint(path)
        for param, recipe in hf_recipes(cfg, ckpt.names(), 0).items():
            full = recipe.combine([ckpt.get(n) for n, _ in recipe.sources])
            for rank in range(2):
                want = shard_param(param, full, cfg, rank, 2)
                assert torch.equal(read_shard(ckpt, recipe, param, cfg, rank, 2), want)


def score(engine: LLMEngine) -> list[torch.Tensor]:
    return prompt_logits(engine, PROMPTS)


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_matches_tp1(tiny_dirs, arch):
    one = LLMEngine.from_pretrained(tiny_dirs[arch], max_num_seqs=16, **KW)
    two = LLMEngine.from_pretrained(tiny_dirs[arch], max_num_seqs=16, tensor_parallel_size=2, **KW)
    heads = [e.runner.model.layers[0].mixer.A_log.shape[0] for e in (one, two)]
    assert heads[1] * 2 == heads[0]  # rank 0 holds half the V heads (and half their states)
    assert two.cache.size.state_bytes * 2 == one.cache.size.state_bytes
    for got, want in zip(score(two), score(one)):
        assert float((got - want).norm() / want.norm()) <= 1e-5
    assert greedy_random(two, 16) == greedy_random(one, 16)
    assert two.stats.max_batch_seqs >= 8


def test_tp2_with_mtp_speculation_matches_tp1(tmp_path):
    # a small vocabulary, so that even a random MTP head's drafts are often right (as test_speculative.py)
    path = add_mtp_weights(save_hf_model("qwen3_next", tmp_path / "mtp", seed=5, vocab_size=12))
    one = LLMEngine.from_pretrained(path, max_num_seqs=4, spec_tokens=2, **KW)
    two = LLMEngine.from_pretrained(path, max_num_seqs=4, spec_tokens=2, tensor_parallel_size=2, **KW)
    assert greedy_random(two, 4, vocab=12) == greedy_random(one, 4, vocab=12)
    # every verify settles the slot on its accepted state (cache.copy_state): a call mirrored to the worker too
    assert two.stats.draft_tokens == one.stats.draft_tokens > 0
    assert two.stats.accepted_tokens == one.stats.accepted_tokens


def test_tp2_with_prefix_caching_matches_tp1(tiny_dirs):
    """A chat's turns resume from snapshots and shared KV blocks on every rank (the cache calls are mirrored)."""
    kw = dict(KW, max_num_batched_tokens=36, max_num_seqs=4)  # prefill grid 32
    one = LLMEngine.from_pretrained(tiny_dirs["qwen3_next"], **kw)
    two = LLMEngine.from_pretrained(tiny_dirs["qwen3_next"], tensor_parallel_size=2, **kw)
    history = list(range(5, 45))
    for turn in range(3):
        outs = []
        for eng in (one, two):
            eng.add_request(f"t{turn}", history, SamplingParams(max_tokens=5, temperature=0))
            while eng.has_unfinished_requests():
                outs += [o.token_ids for o in eng.step() if o.finished]
        assert outs[0] == outs[1], turn
        history = history + outs[0] + [turn + 1] * 7
    assert one.prefix_cache_stats()["hits_total"] == two.prefix_cache_stats()["hits_total"] == 2


def test_a_bad_batch_fails_alone_on_every_rank(tiny_dirs):
    """The worker gets the bad call too, fails alike and waits for the next one: the engine keeps serving."""
    two = LLMEngine.from_pretrained(tiny_dirs["qwen3_5"], max_num_seqs=4, tensor_parallel_size=2, **KW)
    with pytest.raises(BatchError, match="slot 9 has no KV row"):
        two.runner.run([Segment([1, 2], 0, 9)])
    one = LLMEngine.from_pretrained(tiny_dirs["qwen3_5"], max_num_seqs=4, **KW)
    assert greedy_random(two, 3) == greedy_random(one, 3)
