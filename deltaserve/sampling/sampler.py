"""Turns one logits row per sequence into a token. B = sequences, R = sampled rows, V = vocab.

Each sampled row draws its uniform from its sequence's own torch.Generator, so a request's randomness
never depends on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class SampledRows:
    """A step's sampled rows and their parameters on the logits' device ([R] each), staged from the host in one
    non-blocking copy, so that drawing them needs no host sync unless a row has top-p without top-k."""

    rows: torch.Tensor  # [R] long: row of the step's logits
    temperature: torch.Tensor  # [R] float32
    top_k: torch.Tensor  # [R] long, the vocabulary size when off
    top_p: torch.Tensor  # [R] float32
    u: torch.Tensor  # [R] float64 in [0, 1): the row's uniform, from its sequence's generator
    width: int  # candidates ranked for filtered rows (0: no row filters)
    plain: bool  # some row samples from its whole distribution (temperature only)
    nucleus: bool  # some row has top-p without top-k: its nucleus may outgrow the candidates (a host sync)


def stage(rows: list[int], params: list[SamplingParams], u: list[float], vocab: int,
          device: torch.device) -> SampledRows:
    """Rows `rows` of a step sampled with `params` and uniforms `u`, for logits of `vocab` columns on `device`."""
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    host = torch.tensor([rows, [p.temperature for p in params], top_k, [p.top_p for p in params], u],
                        dtype=torch.float64)  # [5, R]
    dev = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
    filtered = [k < vocab or p.top_p < 1 for k, p in zip(top_k, params)]
    width = max((k if k < vocab else min(vocab, CANDIDATES) for k, f in zip(top_k, filtered) if f), default=0)
    return SampledRows(dev[0].long(), dev[1].float(), dev[2].long(), dev[3].float(), dev[4], width,
                       plain=not all(filtered), nucleus=any(k == vocab and p.top_p < 1 for k, p in zip(top_k, params)))


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """logits [B, V] float32, on any device -> one token id per row.

    Greedy rows take the argmax. Every other row draws one uniform from its sequence's generator and
    inverts the CDF of its filtered distribution (`filter_logits` then softmax), on the logits' device:
    no row is copied to the host, and no full sort happens unless top-p's nucleus is wider than CANDIDATES."""
    return pick(logits, sampled_rows(params, generators, logits.shape[-1], logits.device)).tolist()


def sampled_rows(params: list[SamplingParams], generators: list[torch.Generator], vocab: int,
                 device: torch.device) -> SampledRows | None:
    """The non-greedy rows of a step, each with one uniform drawn from its sequence's generator; None if none."""
    rows = [i for i, p in enumerate(params) if not p.greedy]
    u = [float(torch.rand((), generator=generators[i], dtype=torch.float64)) for i in rows]
    return stage(rows, [params[i] for i in rows], u, vocab, device) if rows else None


def pick(logits: torch.Tensor, sampled: SampledRows | None, argmax: torch.Tensor | None = None) -> torch.Tensor:
    """Token ids [B] on the logits' device: argmax ([B], computed unless given), sampled rows drawn over it."""
    tokens = logits.argmax(-1) if argmax is None else argmax.clone()
    if sampled is not None:
        tokens[sampled.rows] = draw_rows(logits[sampled.rows].float(), sampled)
    return tokens


def draw_rows(logits: torch.Tensor, s: SampledRows) -> torch.Tensor:
    """logits [R, V] float32 of the sampled rows -> token ids [R]."""
    vocab = logits.shape[-1]
    x = logits / s.temperature[:, None]
    tokens = None
    if s.plain:  # temperature only: the CDF over the row in vocabulary order
        tokens = _invert((x - x.amax(-1, keepdim=True)).exp(), s.u)
    if s.width:
        ranked = _draw_ranked(x, s.top_k, s.top_p, s.u, s.width, s.nucleus)
        tokens = ranked if tokens is None else torch.where((s.top_k < vocab) | (s.top_p < 1), ranked, tokens)
    return tokens


def _draw_ranked(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor, width: int,
                 nucleus: bool) -> torch.Tensor:
    """Rows with top-k and/or top-p, over their `width` highest logits ([F, V] -> token ids [F]). nucleus: some
    row has top-p without top-k (its probabilities are over the whole row; it may need every token ranked)."""
    vocab = x.shape[-1]
    vals, index = x.topk(width)  # [F, W], descending
    ranked = torch.arange(width, device=x.device) < top_k[:, None]  # top-k keeps the k highest
    # top-p's probabilities are over the top-k tokens when top-k is on (all of them at width V), else over the row
    lse = vals.masked_fill(~ranked, float("-inf")).logsumexp(-1)
    if nucleus:
        lse = torch.where(top_k < vocab, lse, x.logsumexp(-1))
    probs = (vals - lse[:, None]).exp() * ranked
    keep = probs.cumsum(-1) - probs < top_p[:, None]  # drop a token once those ranked above it cover top_p
    out = index.gather(1, _invert(probs * keep, u)[:, None]).squeeze(1)
    if nucleus and width < vocab:  # rows whose nucleus is wider than the candidates: again over the whole row
        short = ((probs.sum(-1) < top_p) & (top_k > width) & (top_p < 1)).nonzero().squeeze(1)
        if len(short):
            out[short] = _draw_ranked(x[short], top_k[short], top_p[short], u[short], vocab, False)
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
