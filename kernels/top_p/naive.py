"""PyTorch reference of the wide-row top-p draw (see the package docstring): a full sort per row."""
from __future__ import annotations

import torch

MASS_SCALE = 2.0 ** 40  # a probability's integer mass: int(p * MASS_SCALE), summed exactly in int64
KEY_FLOOR = -3.4028234663852886e38  # a kept token's race key is at least this; a dropped one's is -inf


def top_p_wide_rows_naive(probs, log_u, fits, tokens, bound: int) -> None:
    """Overwrite ``tokens`` [N] of the rows with ``fits`` False by their nucleus race winner (full sort)."""
    ranked = probs.sort(dim=-1, descending=True, stable=True).values
    mass = (ranked * MASS_SCALE).long()
    above = mass.cumsum(-1) - mass
    last = ranked.gather(-1, (above < bound).sum(-1, keepdim=True) - 1)
    keys = torch.where(probs >= last, (log_u / probs).clamp_min(KEY_FLOOR), float("-inf"))
    tokens.copy_(torch.where(fits, tokens, keys.argmax(-1)))
