"""deltaserve against HF transformers (the oracle) in float32 on tiny random models."""

import pytest
import torch

from deltaserve import LLM, SamplingParams
from tiny_models import build_hf_model

# (arch, overrides): GQA ratios, V heads 1x / 2x QK heads, >= 2 attention layers, dense and MoE FFNs
SHAPES = [
    ("qwen3_next", {}),
    ("qwen3_next", dict(linear_num_value_heads=2, num_key_value_heads=1, decoder_sparse_step=2)),
    ("qwen3_5", {}),
    ("qwen3_5", dict(num_attention_heads=4, num_key_value_heads=4, linear_num_value_heads=2, head_dim=32)),
    ("qwen3_5_moe", {}),
    ("qwen3_5_moe", dict(num_attention_heads=8, num_key_value_heads=2, linear_num_key_heads=4,
                         linear_num_value_heads=8, linear_key_head_dim=8)),
]
IDS = [f"{a}-{i}" for i, (a, _) in enumerate(SHAPES)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=SHAPES, ids=IDS)
def pair(request, tmp_path_factory):
    arch, overrides = request.param
    hf = build_hf_model(arch, seed=len(IDS[SHAPES.index(request.param)]), **overrides)
    path = tmp_path_factory.mktemp("parity")
    hf.save_pretrained(path)
    return hf, LLM(path, dtype="float32", max_num_seqs=4, max_model_len=512)


@pytest.mark.parametrize("length", [1, 7, 63, 64, 130])
def test_prompt_logits_match_hf(pair, length):
    hf, llm = pair
    ids = torch.randint(0, hf.config.vocab_size, (length,), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    (ours,) = llm.score([ids.tolist()])
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) <= 1e-4


def test_prefill_then_32_decode_steps_match_hf(pair):
    hf, llm = pair
    prompt = torch.randint(0, hf.config.vocab_size, (37,), generator=torch.Generator().manual_seed(1))
    # HF greedy with its cache, one token per step
    ref_logits, tokens = [], []
    with torch.no_grad():
        out = hf(prompt[None], use_cache=True)
        for _ in range(32):
            step_logits = out.logits[0, -1]
            ref_logits.append(step_logits)
            tokens.append(int(step_logits.argmax()))
            out = hf(torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True)
    llm.engine.add_request("p", prompt.tolist(), SamplingParams(max_tokens=32, temperature=0), keep_logits=True)
    done = []
    while llm.engine.has_unfinished_requests():
        done += [o for o in llm.engine.step() if o.finished]
    (res,) = done
    assert res.token_ids == tokens
    assert rel_err(res.logits, torch.stack(ref_logits)) <= 1e-4
