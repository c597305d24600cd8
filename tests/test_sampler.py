"""The sampler: inverse-CDF draws on the device follow filter_logits' distribution exactly, row by row.

A uniform grid of N points u = (j + 0.5) / N pushed through the inverse CDF hits each token
N * p(token) times, give or take one; tokens that top-k / top-p remove are never hit.
"""

import pytest
import torch

from deltaserve.sampling import sampler
from deltaserve.sampling.params import SamplingParams
from deltaserve.sampling.sampler import draw_rows, filter_logits, sample, stage

N = 4000
ROUTES = ["cpu-native", "cpu-torch"] + (["cuda"] if torch.cuda.is_available() else [])  # where the row passes run


def on(route: str, monkeypatch) -> str:
    """The device of a route; cpu-torch keeps CPU rows off the C++ kernels (sampler.NativeRows)."""
    if route == "cpu-torch":
        monkeypatch.setattr(sampler.NativeRows, "takes", staticmethod(lambda logits: False))
    elif route == "cpu-native":
        assert sampler.NativeRows.takes(torch.zeros(1, 2)), "the CPU kernels were not built"
    return route.split("-")[0]


def draw(logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """logits [R, V] float32 of sampled rows, u [R] float64 -> token ids [R]."""
    return draw_rows(logits, stage(list(range(len(params))), params, u.tolist(), logits.shape[-1], logits.device))
PARAMS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=2.0, top_k=7),
    SamplingParams(temperature=0.8, top_p=0.6),
    SamplingParams(temperature=1.3, top_k=40, top_p=0.9),
    SamplingParams(temperature=1.0, top_p=1e-6),  # the top token alone
    SamplingParams(temperature=0.7, top_k=100_000),  # wider than the vocabulary: off
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("vocab,candidates", [(50, 1024), (3000, 1024), (3000, 16)])
@pytest.mark.parametrize("p", PARAMS, ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}")
def test_draw_inverts_the_filtered_distribution(monkeypatch, vocab, candidates, p, route):
    """candidates 16 at vocab 3000: top-p's nucleus is wider than the candidates, so the full sort runs."""
    device = on(route, monkeypatch)
    monkeypatch.setattr(sampler, "CANDIDATES", candidates)
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(vocab)) * 2
    u = (torch.arange(N, dtype=torch.float64) + 0.5) / N
    tokens = draw(logits.expand(N, vocab).to(device), [p] * N, u.to(device)).cpu()
    counts = torch.bincount(tokens, minlength=vocab).double()
    probs = filter_logits(logits, p).softmax(-1).double()
    assert counts.sum() == N
    assert torch.all(counts[probs == 0] == 0)
    assert (counts - N * probs).abs().max() <= 1.0 + 1e-6


@pytest.mark.parametrize("route", ["cpu-native", "cpu-torch"])
def test_rows_depend_only_on_their_generator(monkeypatch, route):
    """A row's token is the same alone or among other rows (greedy and sampled, different filters, some rows
    with a nucleus wider than the candidates and some without)."""
    on(route, monkeypatch)
    monkeypatch.setattr(sampler, "CANDIDATES", 16)
    vocab = 500
    scale = torch.tensor([0.2, 8.0, 0.2, 8.0, 0.5, 3.0])[:, None]
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(3)) * scale
    params = [PARAMS[i % len(PARAMS)] for i in range(5)] + [SamplingParams(temperature=0)]
    for trial in range(20):
        together = sample(logits, params, [torch.Generator().manual_seed(100 * trial + i) for i in range(6)])
        alone = [sample(logits[i:i + 1], [params[i]], [torch.Generator().manual_seed(100 * trial + i)])[0]
                 for i in range(6)]
        assert together == alone
    assert together[5] == int(logits[5].argmax())


@pytest.mark.parametrize("route", ["cpu-native", "cpu-torch"])
def test_extreme_uniforms_never_pick_a_removed_token(monkeypatch, route):
    """u = 0 and u just below 1 (u * total rounds up to the total in float32) land on kept tokens."""
    on(route, monkeypatch)
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=1.0, top_p=0.5)]
    for u in (0.0, 1.0 - 2.0 ** -53):
        tokens = draw(logits, params, torch.tensor([u, u], dtype=torch.float64))
        for row, p, tok in zip(logits, params, tokens.tolist()):
            assert filter_logits(row, p)[tok] > float("-inf"), (u, p)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("p", [SamplingParams(temperature=1.0, top_k=7), SamplingParams(temperature=0.5, top_p=0.3),
                               SamplingParams(temperature=1.0, top_k=30, top_p=0.5)],
                         ids=lambda p: f"k{p.top_k}-p{p.top_p}")
def test_ties_keep_a_row_independent_of_its_batch(monkeypatch, route, p):
    """Logits with many exact ties (as bf16 logits have): the kept set is whole runs of equal logits and the
    CDF runs in vocabulary order, so a row's token is the same alone, beside rows that rank more candidates,
    and with a candidate count its nucleus outgrows; its draws follow filter_logits exactly."""
    device = on(route, monkeypatch)
    vocab = 400
    row = torch.randint(0, 6, (vocab,), generator=torch.Generator().manual_seed(5)).float() * 0.5
    u = (torch.arange(N, dtype=torch.float64) + 0.5) / N
    alone = draw(row.expand(N, vocab).to(device), [p] * N, u.to(device)).cpu()
    others = [SamplingParams(temperature=1.0, top_k=300), SamplingParams(temperature=0.7)]
    batch = torch.stack([row, torch.randn(vocab), torch.randn(vocab)]).to(device)
    for j in range(0, N, 97):
        uj = torch.tensor([u[j], 0.3, 0.6], dtype=torch.float64, device=device)
        assert int(draw(batch, [p] + others, uj)[0]) == int(alone[j])
    monkeypatch.setattr(sampler, "CANDIDATES", 4)
    assert torch.equal(draw(row.expand(N, vocab).to(device), [p] * N, u.to(device)).cpu(), alone)
    counts = torch.bincount(alone, minlength=vocab).double()
    probs = filter_logits(row, p).softmax(-1).double()
    assert torch.all(counts[probs == 0] == 0)
    assert (counts - N * probs).abs().max() <= 1.0 + 1e-6


@pytest.mark.parametrize("vocab", [50, 3000, 151936])
def test_native_row_passes_match_torch(vocab):
    """The C++ passes (kernels/csrc/sample.h) against torch on the same rows: the top values bit for bit (ties
    included: bf16-rounded logits), the kept mass to float rounding, and each drawn token's CDF interval (float64,
    torch weights) holding u * total up to float32 rounding."""
    if not sampler.NativeRows.takes(torch.zeros(1, 2)):
        pytest.skip("the CPU kernels were not built")
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(3, vocab, generator=g) * 3).bfloat16().float()
    t = torch.tensor([0.7, 1.0, 1.6])
    native, ref = sampler.NativeRows(logits, t), sampler.TorchRows(logits, t)
    for width in sorted({1, 7, min(300, vocab), vocab}):
        assert torch.equal(native.top_values(width), ref.top_values(width))
    floor = torch.stack([ref.x[0].min(), ref.x[1].median(), ref.top_values(5)[2, -1]])
    want = (ref.weights.double() * (ref.x >= floor[:, None])).sum(-1)
    assert torch.allclose(native.mass(floor).double(), want, rtol=1e-5)
    weights = (ref.weights * (ref.x >= floor[:, None])).double()
    cdf = weights.cumsum(-1)
    for u in torch.linspace(0, 1 - 1e-9, 101, dtype=torch.float64):
        tokens = native.invert(floor, torch.full((3,), float(u), dtype=torch.float64))
        for r, tok in enumerate(tokens.tolist()):
            total, hi = cdf[r, -1], cdf[r, tok]
            assert weights[r, tok] > 0
            assert hi - weights[r, tok] - 1e-5 * total <= u * total <= hi + 1e-5 * total


def test_native_argmax_is_torchs():
    """The C++ argmax (CPU greedy rows) against torch.argmax: the first of equal maxima, -inf rows, odd widths."""
    if not sampler.NativeRows.takes(torch.zeros(1, 2)):
        pytest.skip("the CPU kernels were not built")
    g = torch.Generator().manual_seed(0)
    for vocab in (1, 5, 63, 64, 1000, 151936):
        x = torch.randint(-3, 4, (6, vocab), generator=g).float()  # many ties
        x[1] = float("-inf")
        x[2, -1] = 100.
        assert torch.equal(sampler.greedy(x), x.argmax(-1))
