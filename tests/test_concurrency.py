"""The core invariant: a sequence's outputs depend only on its own tokens.

Not on which sequences share its batches, their lengths, arrival order, aborts, or its slot.
"""

import random

import pytest
import torch

from deltaserve import LLM, SamplingParams
from deltaserve.weights.gguf_export import export_gguf
from drive import drive


def make_llm(path, max_num_seqs=16):
    # a small token budget forces chunked prefills to share steps with decodes
    return LLM(path, dtype="float32", max_num_seqs=max_num_seqs, max_model_len=256, max_num_batched_tokens=24)


@pytest.fixture(scope="module", params=["qwen3_next", "qwen3_5", "qwen3_5-q8_0"])
def model_dir(request, tiny_dirs, tmp_path_factory):
    """The tiny checkpoints, and one as a Q8_0 GGUF file: weights kept in blocks, int8 activations."""
    arch, _, quant = request.param.partition("-")
    if not quant:
        return tiny_dirs[arch]
    return export_gguf(tiny_dirs[arch], tmp_path_factory.mktemp("q8") / "m.gguf", quant)


@pytest.fixture(scope="module")
def llm(model_dir):
    return make_llm(model_dir)


def solo(engine, rid, prompt, params):
    return drive(engine, [(rid, prompt, params, 0, None)])[rid][:2]


@pytest.mark.parametrize("np_", [1, 2, 3, 4, 6, 8, 16])
def test_each_sequence_matches_its_solo_run(model_dir, np_):
    engine = make_llm(model_dir, max_num_seqs=np_).engine
    rng = random.Random(np_)
    vocab = engine.cfg.vocab_size
    n_req = np_ * 2 if np_ > 1 else 2  # more requests than slots: slots are reused after finish/abort
    requests = []
    for i in range(n_req):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        params = SamplingParams(max_tokens=rng.randint(4, 14), temperature=0) if i % 3 else \
            SamplingParams(max_tokens=rng.randint(4, 14), temperature=0.9, top_p=0.9, seed=i)
        abort = rng.randint(2, 6) if i % 5 == 4 else None
        requests.append((f"r{i}", prompt, params, rng.randint(0, 8), abort))
    together = drive(engine, requests)
    assert engine.stats.max_batch_seqs >= min(np_, 2)
    for rid, prompt, params, _, abort in requests:
        ref_tokens, ref_logits = solo(engine, rid + "-solo", prompt, params)
        tokens, logits, _ = together[rid]
        if abort is None:
            assert tokens == ref_tokens, rid
            torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
        else:  # aborted midway: what it produced is a prefix of its solo answer
            assert tokens == ref_tokens[: len(tokens)], rid
    assert engine.scheduler.slots.available == engine.cache.max_num_seqs


def test_identical_prompts_give_one_answer(llm):
    prompt = list(range(3, 30))
    outs = llm.generate([prompt] * 16, SamplingParams(max_tokens=12, temperature=0))
    assert len({tuple(o.token_ids) for o in outs}) == 1


def test_seeded_sampling_ignores_batch_company(llm):
    params = SamplingParams(max_tokens=10, temperature=1.0, top_k=50, seed=1234)
    alone = llm.generate([[5, 6, 7]], params)[0].token_ids
    crowd = llm.generate([[5, 6, 7]] + [[i, i + 1] for i in range(9)],
                         [params] + [SamplingParams(max_tokens=10, temperature=1.0)] * 9)
    assert crowd[0].token_ids == alone


@pytest.mark.parametrize("budget", [1, 2, 5, 16, 64])
def test_chunked_prefill_equals_one_shot(tiny_dirs, budget):
    prompts = [list(range(10, 60)), list(range(100, 107)), [3]]
    one_shot = LLM(tiny_dirs["qwen3_5_moe"], dtype="float32", max_num_seqs=4, max_model_len=128,
                   max_num_batched_tokens=256)
    chunked = LLM(tiny_dirs["qwen3_5_moe"], dtype="float32", max_num_seqs=4, max_model_len=128,
                  max_num_batched_tokens=budget)
    for ref, got in zip(one_shot.score(prompts), chunked.score(prompts)):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    params = SamplingParams(max_tokens=8, temperature=0)
    assert [o.token_ids for o in one_shot.generate(prompts, params)] == \
        [o.token_ids for o in chunked.generate(prompts, params)]
