"""MTP speculative decoding stays lossless at any np: greedy output identical, sampled distribution unchanged."""


import pytest
import torch

from deltaserve import LLM, LLMEngine, SamplingParams
from deltaserve.weights.gguf_export import export_gguf
from drive import drive
from tiny_models import add_mtp_weights, save_hf_model


@pytest.fixture(scope="module")
def mtp_dir(tmp_path_factory):
    # a small vocabulary, so that even a random MTP head's drafts are often right
    path = save_hf_model("qwen3_next", tmp_path_factory.mktemp("mtp"), seed=5, vocab_size=12)
    return add_mtp_weights(path)


def engine(path, np_, k=0, budget=64):
    return LLMEngine.from_pretrained(path, dtype="float32", max_num_seqs=np_, max_model_len=128,
                                     max_num_batched_tokens=budget, spec_tokens=k)


def requests(np_, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(2 * np_):
        prompt = torch.randint(0, vocab, (int(torch.randint(1, 30, (), generator=g)),), generator=g).tolist()
        params = SamplingParams(max_tokens=int(torch.randint(3, 16, (), generator=g)), temperature=0)
        abort = 3 if i % 5 == 4 else None
        out.append((f"r{i}", prompt, params, int(torch.randint(0, 6, (), generator=g)), abort))
    return out


@pytest.fixture(scope="module")
def mtp_q8_0(tmp_path_factory):
    """A qwen3_5 checkpoint with MTP as a Q8_0 GGUF file (weights in blocks, int8 activations; qwen3next
    conversions drop MTP, as llama.cpp's converter does)."""
    d = tmp_path_factory.mktemp("mtp_q8")
    return export_gguf(add_mtp_weights(save_hf_model("qwen3_5", d / "hf", seed=5, vocab_size=12)), d / "m.gguf", "q8_0")


@pytest.mark.parametrize("np_,k", [(1, 2), (4, 3), (8, 2)])
def test_greedy_with_mtp_equals_without_on_a_quantized_file(mtp_q8_0, np_, k):
    test_greedy_with_mtp_equals_without(mtp_q8_0, np_, k)


@pytest.mark.parametrize("np_,k", [(1, 1), (1, 3), (2, 2), (4, 1), (4, 3), (8, 2), (8, 3)])
def test_greedy_with_mtp_equals_without(mtp_dir, np_, k):
    reqs = requests(np_, 12, seed=np_ * 10 + k)
    plain = drive(engine(mtp_dir, np_), reqs)
    spec_engine = engine(mtp_dir, np_, k)
    spec = drive(spec_engine, reqs)
    for rid, _, _, _, abort in reqs:
        if abort is None:
            assert spec[rid][0] == plain[rid][0], rid
            torch.testing.assert_close(spec[rid][1], plain[rid][1], rtol=0, atol=1e-5)
        else:  # aborted midway: a prefix of the full answer
            assert spec[rid][0] == plain[rid][0][: len(spec[rid][0])] or plain[rid][0] == spec[rid][0][: len(plain[rid][0])]
    st = spec_engine.stats
    assert st.draft_tokens > 0  # (a random MTP head is rarely right: acceptance is tested with sampling below)
    assert spec_engine.scheduler.slots.available == np_


def test_mtp_with_small_budget_and_prefill_sharing_steps(mtp_dir):
    """Drafts are dropped when the token budget is short; prefill chunks share steps with verifies."""
    reqs = requests(4, 12, seed=99)
    plain = drive(engine(mtp_dir, 4, budget=5), reqs)
    spec = drive(engine(mtp_dir, 4, k=3, budget=5), reqs)
    assert {r: spec[r][0] for r in spec} == {r: plain[r][0] for r in plain}


def exact_two_token_distribution(path, prompt, params):
    """p(t1, t2 | prompt) from the model itself: [V, V]."""
    from deltaserve.sampling.sampler import filter_logits
    llm = LLM(path, dtype="float32", max_num_seqs=16, max_model_len=64)
    vocab = llm.engine.cfg.vocab_size
    first = filter_logits(llm.score([prompt])[0][-1], params).softmax(-1)
    second = torch.stack([filter_logits(lg[-1], params).softmax(-1)
                          for lg in llm.score([prompt + [t] for t in range(vocab)])])
    return first[:, None] * second


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token the model rules out was produced"
    n = counts.sum()
    big = probs * n >= 5  # cells expected fewer than 5 times are pooled (chi-square needs counts)
    observed = torch.cat([counts[big], counts[keep & ~big].sum()[None]])
    expected = torch.cat([probs[big], probs[keep & ~big].sum()[None]]) * n
    observed, expected = observed[expected > 0], expected[expected > 0]
    stat = ((observed - expected) ** 2 / expected).sum()
    df = len(expected) - 1
    return float(1 - torch.distributions.Chi2(torch.tensor(float(df))).cdf(stat))


# three tokens, so that the second is verified from a draft; the pair (t1, t2) is compared
@pytest.mark.parametrize("params", [SamplingParams(max_tokens=3, temperature=1.0),
                                    SamplingParams(max_tokens=3, temperature=0.8, top_k=5)], ids=["plain", "top_k"])
def test_sampled_distribution_with_mtp_matches_the_model(mtp_dir, params):
    """Rejection sampling keeps the model's distribution: sampled pairs (t1, t2) fit the exact one."""
    prompt = [3, 1, 4]
    exact = exact_two_token_distribution(mtp_dir, prompt, params)
    n = 1500
    results = {}
    for k in (0, 2):
        eng = engine(mtp_dir, 32, k)
        reqs = [(f"s{i}", prompt, SamplingParams(**{**params.__dict__, "seed": 10_000 * k + i}), 0, None)
                for i in range(n)]
        out = drive(eng, reqs)
        counts = torch.zeros_like(exact)
        for tokens, *_ in out.values():
            counts[tokens[0], tokens[1]] += 1
        results[k] = (chi_square_p_value(counts.flatten(), exact.flatten()), eng.stats)
    assert results[0][0] > 1e-3  # the plain sampler fits (the test itself is sound)
    assert results[2][0] > 1e-3, results[2]
    st = results[2][1]
    assert 0.05 * st.draft_tokens < st.accepted_tokens < 0.95 * st.draft_tokens  # both branches, often
