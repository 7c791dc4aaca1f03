"""Next-token choice for the decode engine: greedy, or temperature / top-k / top-p sampling.

The filters are HF's logits warpers in HF's order (temperature, then top-k, then top-p, at
least one token kept), so the settings mean what they mean in ``generate()``. Top-p keeps the
most likely tokens until the mass ranked above the next one reaches ``top_p`` (HF's rule), and
every token exactly as likely as the last one kept (HF's choice among such ties depends on its
sort; here it does not). The masses are summed as integers (``p * 2**40`` truncated), so the
sums are exact and every way of computing the nucleus (a sort, the top-k candidates, a threshold
search) gives the same one; it differs from HF's float sums only for a token within about 1e-7
of the boundary.

The draw is the race ``argmax(log U / p)`` (``= argmax(p / E)`` with ``E = -log U ~ Exp(1)``), one
uniform ``U`` per vocabulary entry: token i wins with probability proportional to ``p_i`` among the
kept tokens. It needs no host synchronisation and no data-dependent shape, and it draws from an
explicit generator, so a seeded step can be captured in a CUDA graph and repeats.

Top-p without a full-vocabulary sort: the ``CANDIDATES`` most likely tokens are taken (sorted). A
row whose least likely candidate is below its nucleus's last token has its nucleus inside them and
races there. A row whose nucleus is wider: on CPU the batch falls back to the full sort (a host
check); on CUDA a Triton kernel (``lbsearch.kernels.top_p``) handles such rows alone (one program per row, the others return at
once: no host sync, so it runs inside the engine's CUDA graph), finding the nucleus's last token
by bisection over the float bits with exact integer masses and racing over the whole vocabulary.
Every way computes the same numbers (the same probabilities, integer sums and ``U`` per token), so
a seed gives the same tokens whichever runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels.top_p import KEY_FLOOR, MASS_SCALE

_KERNEL = None  # the wide-row kernel once imported; False where Triton is missing


@dataclass(frozen=True)
class Sampling:
    """``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()
CANDIDATES = 1024  # top-p: the tokens ranked first; the nucleus is computed among them when it fits


def _scaled(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """float32 scores: logits / temperature, tokens outside the top-k (ties with the k-th kept, as HF) at -inf."""
    scores = logits.float() / s.temperature
    if 0 < s.top_k < scores.shape[-1]:
        kth = scores.topk(s.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return scores


def _mass_bound(top_p: float) -> int:
    """``top_p`` as an integer mass: a token stays while the mass ranked above it is below this."""
    return max(1, int(top_p * MASS_SCALE))


def _nucleus(ranked: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept [N, m], the last kept probability [N, 1]) for probabilities ``ranked`` [N, m] in descending order."""
    mass = (ranked * MASS_SCALE).long()
    above = mass.cumsum(-1) - mass  # exact: the integer mass ranked above each token (non-decreasing)
    last = ranked.gather(-1, (above < bound).sum(-1, keepdim=True) - 1)  # above[0] = 0 < bound: one at least
    return ranked >= last, last


def _race_among(ranked: torch.Tensor, ids: torch.Tensor, kept: torch.Tensor, log_u: torch.Tensor) -> torch.Tensor:
    """The kept token (of ``ids``) with the largest ``log U / p``; ``log_u`` holds ``log U`` for the whole vocabulary."""
    keys = torch.where(kept, (log_u.gather(-1, ids) / ranked).clamp_min(KEY_FLOOR), float("-inf"))
    return ids.gather(-1, keys.argmax(-1, keepdim=True))[..., 0]


def _full_sort(probs, log_u, bound: int) -> torch.Tensor:
    ranked, order = probs.sort(dim=-1, descending=True, stable=True)
    kept, _ = _nucleus(ranked, bound)
    return _race_among(ranked, order, kept, log_u)


def _candidates(probs, log_u, bound: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [N], whether each row's nucleus lies in its top ``k`` [N] bool)."""
    ranked, ids = probs.topk(k, dim=-1)  # sorted, descending: the same numbers as the sort's first k
    kept, last = _nucleus(ranked, bound)
    fits = (ranked[..., -1:] < last)[..., 0]  # every token outside is below the last kept one: dropped
    return _race_among(ranked, ids, kept, log_u), fits


def _wide_rows_kernel():
    """The Triton wide-row kernel (``lbsearch.kernels.top_p``), imported on first use (so ``TRITON_INTERPRET``
    set before that is honoured); None without Triton."""
    global _KERNEL
    if _KERNEL is None:
        try:
            from .kernels.top_p import wide_rows
        except ImportError:  # pragma: no cover - images without Triton: a CUDA step sorts when a row needs it
            _KERNEL = False
            return None
        _KERNEL = wide_rows._kernel
    return _KERNEL or None


def _wide_rows(probs, log_u, fits, tokens, bound: int) -> None:
    """Overwrite ``tokens`` of the rows whose nucleus is wider than the candidates (``fits`` False), in Triton."""
    from .kernels.top_p.wide_rows import top_p_wide_rows_triton

    top_p_wide_rows_triton(probs, log_u, fits, tokens, bound)


def _top_p_pick(probs: torch.Tensor, s: Sampling, generator, k: int) -> torch.Tensor:
    log_u = torch.rand(probs.shape, generator=generator, device=probs.device).log_()  # U = 0: key -inf, floored
    bound = _mass_bound(s.top_p)
    if k >= probs.shape[-1]:
        return _full_sort(probs, log_u, bound)
    tokens, fits = _candidates(probs, log_u, bound, k)
    if probs.is_cuda and _wide_rows_kernel() is not None:
        tokens = tokens.contiguous()
        _wide_rows(probs.contiguous(), log_u, fits, tokens, bound)
        return tokens
    if probs.is_cuda and torch.cuda.is_current_stream_capturing():
        return _full_sort(probs, log_u, bound)  # no Triton: a captured step cannot ask the host
    return tokens if bool(fits.all()) else _full_sort(probs, log_u, bound)


def filter_logits(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """float32 logits [N, V] scaled by the temperature, with tokens outside top-k / top-p at -inf (full sort)."""
    scores = _scaled(logits, s)
    if s.top_p < 1:
        ranked, order = scores.softmax(-1).sort(dim=-1, descending=True, stable=True)
        kept, _ = _nucleus(ranked, _mass_bound(s.top_p))
        scores = scores.masked_fill(~torch.zeros_like(kept).scatter(-1, order, kept), float("-inf"))
    return scores


def nucleus_probs(logits: torch.Tensor, s: Sampling, k: int | None = None) -> torch.Tensor:
    """[N, V] probabilities after the filters (dropped tokens 0, the rest not renormalised), computed
    among the top ``k`` (default ``CANDIDATES``) where every row's nucleus fits there, else by the full sort."""
    probs = _scaled(logits, s).softmax(-1)
    if s.top_p >= 1:
        return probs
    k, bound = min(CANDIDATES if k is None else k, probs.shape[-1]), _mass_bound(s.top_p)
    ranked, ids = probs.topk(k, dim=-1)
    kept, last = _nucleus(ranked, bound)
    if k < probs.shape[-1] and not bool((ranked[..., -1:] < last).all()):
        ranked, ids = probs.sort(dim=-1, descending=True, stable=True)
        kept, _ = _nucleus(ranked, bound)
    return torch.zeros_like(probs).scatter(-1, ids, torch.where(kept, ranked, 0.0))


def _race(probs: torch.Tensor, generator) -> torch.Tensor:
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(1e-20)
    return (probs / race).argmax(-1)


def pick(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None,
         k: int | None = None) -> torch.Tensor:
    """Next tokens [N] from logits [N, V]; ``k``: top-p candidates (default ``CANDIDATES``; >= V sorts)."""
    if s.greedy:
        return logits.argmax(-1)
    probs = _scaled(logits, s).softmax(-1)
    if s.top_p >= 1:
        return _race(probs, generator)
    return _top_p_pick(probs, s, generator, CANDIDATES if k is None else k)
