"""Turns one logits row per sequence into a token. B = sequences, R = sampled rows, V = vocab.

Each sampled row draws its uniform from its sequence's own torch.Generator, so a request's randomness
never depends on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import cpu_native
from ..transfer import on_device
from .params import SamplingParams


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to one row [V]; filtered entries become -inf."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        drop = ~nucleus(sorted_logits[None], sorted_logits.softmax(-1)[None], torch.tensor([params.top_p]))[0]
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def nucleus(vals: torch.Tensor, probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-p's kept prefix ([R, W] bool) of rows of logits sorted descending (vals) and their probabilities: a
    token stays while the tokens strictly more likely cover less than top_p ([R]). Equal logits stay or go
    together, so the result does not depend on how a sort ordered ties."""
    above = probs.cumsum(-1) - probs  # mass ranked above each token
    first = torch.ones_like(vals, dtype=torch.bool)
    first[:, 1:] = vals[:, 1:] != vals[:, :-1]  # the first of each run of equal logits
    return torch.where(first, above, 0).cummax(-1).values < top_p[:, None]  # the run's first token decides


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
    nucleus_rows: bool  # some row has top-p without top-k: its nucleus may outgrow the candidates (a host sync)


def stage(rows: list[int], params: list[SamplingParams], u: list[float], vocab: int,
          device: torch.device) -> SampledRows:
    """Rows `rows` of a step sampled with `params` and uniforms `u`, for logits of `vocab` columns on `device`."""
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    host = torch.tensor([rows, [p.temperature for p in params], top_k, [p.top_p for p in params], u],
                        dtype=torch.float64)  # [5, R]
    dev = on_device([host], device)[0]
    width = max((k if k < vocab else min(vocab, CANDIDATES) for k, p in zip(top_k, params) if k < vocab or p.top_p < 1),
                default=0)
    return SampledRows(dev[0].long(), dev[1].float(), dev[2].long(), dev[3].float(), dev[4], width,
                       nucleus_rows=any(k == vocab and p.top_p < 1 for k, p in zip(top_k, params)))


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
    if sampled is not None and len(sampled.rows) == len(logits):  # every row sampled (rows ascending): no argmax,
        return draw_rows(logits.float(), sampled)  # no gathered copy of the rows
    tokens = greedy(logits) if argmax is None else argmax.clone()
    if sampled is not None:
        tokens[sampled.rows] = draw_rows(logits[sampled.rows].float(), sampled)
    return tokens


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """[B] argmax of each row (the first of equal maxima): C++ on CPU float32 logits (one vector pass, no
    torch.argmax's ~0.3 ms per 248320-wide row here), else torch."""
    return cpu_native.ops().sample_argmax(logits.contiguous()) if NativeRows.takes(logits) else logits.argmax(-1)


def draw_rows(logits: torch.Tensor, s: SampledRows) -> torch.Tensor:
    """logits [R, V] float32 of the sampled rows -> token ids [R].

    A row's token depends only on its own logits, parameters and uniform: top-k / top-p keep every token at
    or above a per-row logit floor (decided by value, ties together), and the CDF runs in vocabulary order,
    so neither the other rows nor how many candidates were ranked can change it."""
    rows = NativeRows(logits, s.temperature) if NativeRows.takes(logits) else TorchRows(logits, s.temperature)
    floor = torch.full_like(s.temperature, float("-inf"))  # -inf: every token stays
    if s.width:
        floor = _floor(rows, s.top_k, s.top_p, s.width, s.nucleus_rows)
    return rows.invert(floor, s.u)


class TorchRows:
    """The passes over whole rows [R, V] that the sampler needs, in torch ops (any device): x = logits / T."""

    def __init__(self, logits: torch.Tensor, temperature: torch.Tensor):
        self.x = logits / temperature[:, None]
        self.vocab = logits.shape[-1]
        self.weights = (self.x - self.x.amax(-1, keepdim=True)).exp()  # [R, V] unnormalised probabilities

    def top_values(self, width: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[R, width] the width largest x of each row (of `rows` only), descending."""
        return (self.x if rows is None else self.x[rows]).topk(width).values

    def mass(self, floor: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[R] sum of exp(x - max x) over x >= floor (rows: only these, floor theirs)."""
        x, w = (self.x, self.weights) if rows is None else (self.x[rows], self.weights[rows])
        return (w * (x >= floor[:, None])).sum(-1)

    def invert(self, floor: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """[R] the token whose CDF interval (weights of x >= floor, vocabulary order) holds u * total."""
        return _invert(self.weights * (self.x >= floor[:, None]), u)


class NativeRows:
    """The same passes by the C++ kernels on CPU logits (kernels/csrc/sample.h): x computed on the fly, no [R, V]
    temporaries (each would be a fresh allocation that page-faults in: 3 ms per [8, 151936] torch pass here)."""

    @staticmethod
    def takes(logits: torch.Tensor) -> bool:
        return logits.device.type == "cpu" and logits.dtype == torch.float32 and cpu_native.ops() is not None

    def __init__(self, logits: torch.Tensor, temperature: torch.Tensor):
        self.ops, self.logits, self.t = cpu_native.ops(), logits.contiguous(), temperature.contiguous()
        self.vocab = logits.shape[-1]

    def _rows(self, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.logits, self.t) if rows is None else (self.logits[rows], self.t[rows])

    def top_values(self, width: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.ops.sample_top(*self._rows(rows), width)

    def mass(self, floor: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.ops.sample_mass(*self._rows(rows), floor.contiguous())

    def invert(self, floor: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.ops.sample_invert(self.logits, self.t, floor.contiguous(), u.contiguous())


def _floor(rows, top_k: torch.Tensor, top_p: torch.Tensor, width: int, nucleus_rows: bool,
           which: torch.Tensor | None = None) -> torch.Tensor:
    """The lowest logit each row keeps under its top-k and top-p ([R]; -inf keeps all), from its `width` highest
    (rows: TorchRows or NativeRows; which: only these rows, top_k / top_p theirs). nucleus_rows: some row has top-p
    without top-k (it may need every token ranked)."""
    vals = rows.top_values(width, which)  # [R, W] descending
    vocab = rows.vocab
    kth = vals.gather(1, (top_k.clamp(max=width) - 1)[:, None]).squeeze(1)
    floor = torch.where(top_k < vocab, kth, float("-inf"))  # top-k: every token at least as high as the k-th
    # top-p's probabilities are over the tokens top-k keeps (the whole row without top-k)
    lse = vals[:, 0] + rows.mass(floor, which).log()  # vals[:, 0]: the row maximum the mass is relative to
    probs = (vals - lse[:, None]).exp() * (vals >= floor[:, None])
    kept = nucleus(vals, probs, top_p).sum(-1)  # a prefix of at least one token
    lowest = vals.gather(1, (kept - 1)[:, None]).squeeze(1)
    floor = torch.where(top_p < 1, torch.maximum(floor, lowest), floor)
    if nucleus_rows and width < vocab:  # rows whose nucleus is wider than the candidates: again over the whole row
        short = ((probs.sum(-1) < top_p) & (top_k == vocab) & (top_p < 1)).nonzero().squeeze(1)
        if len(short):
            again = short if which is None else which[short]
            floor[short] = _floor(rows, top_k[short], top_p[short], vocab, False, again)
    return floor


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
