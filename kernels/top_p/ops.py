"""Backend dispatch of the wide-row top-p draw: "torch" (naive), "triton" (wide_rows) or "auto"."""
from __future__ import annotations

import torch

from ..backend import resolve
from .naive import top_p_wide_rows_naive

ENV_VAR = "LBSEARCH_TOP_P_BACKEND"


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """"triton" on CUDA when Triton imports (``auto``), else "torch"; ``backend`` / the env var override."""
    return resolve("top-p", ENV_VAR, backend, device)


def top_p_wide_rows(probs, log_u, fits, tokens, bound: int, backend: str | None = None) -> None:
    """Overwrite ``tokens`` of the rows whose nucleus is wider than the candidates (package docstring)."""
    if resolve_backend(backend, probs.device) == "torch":
        return top_p_wide_rows_naive(probs, log_u, fits, tokens, bound)
    from .wide_rows import top_p_wide_rows_triton

    return top_p_wide_rows_triton(probs, log_u, fits, tokens, bound)
