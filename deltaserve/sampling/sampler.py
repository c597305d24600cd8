"""Turns one logits row per sequence into a token. B = sequences, R = sampled rows, V = vocab.

Each sampled row draws its uniform from its sequence's own torch.Generator, so a request's randomness
never depends on which other requests share the batch.
"""

from __future__ import annotations

import torch

from .params import SamplingParams


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to one row [V]; filtered entries become -inf."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already cover top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


CANDIDATES = 1024  # top-p looks for its nucleus among this many top tokens; a full sort only when it is wider


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """logits [B, V] float32, on any device -> one token id per row.

    Greedy rows take the argmax. Every other row draws one uniform from its sequence's generator and
    inverts the CDF of its filtered distribution (`filter_logits` then softmax), on the logits' device:
    no row is copied to the host, and no full sort happens unless top-p's nucleus is wider than CANDIDATES."""
    tokens = logits.argmax(-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        u = torch.stack([torch.rand((), generator=generators[i], dtype=torch.float64) for i in rows])
        index = torch.tensor(rows, device=logits.device)
        tokens[index] = draw(logits[index], [params[i] for i in rows], u.to(logits.device))
    return tokens.tolist()


def draw(logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """logits [R, V] float32, params of sampled rows, u [R] float64 in [0, 1) -> token ids [R]."""
    vocab = logits.shape[-1]
    x = logits / torch.tensor([p.temperature for p in params], device=logits.device)[:, None]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    filtered = [i for i, p in enumerate(params) if top_k[i] < vocab or p.top_p < 1]
    plain = [i for i in range(len(params)) if i not in filtered]
    out = torch.empty(len(params), dtype=torch.long, device=logits.device)
    if plain:  # temperature only: the CDF over the row in vocabulary order
        i = torch.tensor(plain, device=logits.device)
        out[i] = _invert((x[i] - x[i].amax(-1, keepdim=True)).exp(), u[i])
    if filtered:
        i = torch.tensor(filtered, device=logits.device)
        width = max(top_k[j] if top_k[j] < vocab else min(vocab, CANDIDATES) for j in filtered)
        out[i] = _draw_ranked(x[i], torch.tensor([top_k[j] for j in filtered], device=logits.device),
                              torch.tensor([params[j].top_p for j in filtered], device=logits.device), u[i], width)
    return out


def _draw_ranked(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor, width: int):
    """Rows with top-k and/or top-p, over their `width` highest logits ([F, V] -> token ids [F])."""
    vocab = x.shape[-1]
    vals, index = x.topk(width)  # [F, W], descending
    ranked = torch.arange(width, device=x.device) < top_k[:, None]  # top-k keeps the k highest
    # top-p's probabilities are over the top-k tokens when top-k is on, else over the whole row
    lse = torch.where(top_k < vocab, vals.masked_fill(~ranked, float("-inf")).logsumexp(-1), x.logsumexp(-1))
    probs = (vals - lse[:, None]).exp() * ranked
    keep = probs.cumsum(-1) - probs < top_p[:, None]  # drop a token once those ranked above it cover top_p
    out = index.gather(1, _invert(probs * keep, u)[:, None]).squeeze(1)
    if width < vocab:  # rows whose nucleus is wider than the candidates: again over the whole sorted row
        short = ((probs.sum(-1) < top_p) & (top_k > width)).nonzero().squeeze(1)
        if len(short):
            out[short] = _draw_ranked(x[short], top_k[short], top_p[short], u[short], vocab)
    return out


def _invert(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Column of each row's weights ([R, N], >= 0) whose CDF interval holds u * total (u [R] in [0, 1))."""
    cdf = weights.cumsum(-1)
    total = cdf[:, -1:]
    # strictly below the total, so a zero-weight (dropped) column past the last kept one is never hit
    target = torch.minimum((u[:, None] * total).to(cdf.dtype), torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def token_logprobs(row: torch.Tensor, token: int, k: int) -> tuple[float, dict[int, float]]:
    """The sampled token's log-probability under the model's raw distribution, and the top k ([V] row)."""
    logp = row.log_softmax(-1)
    top = logp.topk(k) if k else None
    return float(logp[token]), ({} if top is None else dict(zip(top.indices.tolist(), top.values.tolist())))
