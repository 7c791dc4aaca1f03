"""Public LSWA entry points with backend dispatch.

``backend``: "torch" (the naive reference), "triton" (chunk.py / fused_recurrent.py / fused_fmap.py) or "auto"
(Triton when the tensors are on CUDA and Triton imports, else torch). With ``backend=None`` the
environment variable ``LBSEARCH_LSWA_BACKEND`` decides, defaulting to "auto".
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ..backend import resolve
from .naive import LSWAState, lswa_decode_fmap_naive, lswa_decode_naive, lswa_naive, lswa_state_from_prefill

ENV_VAR = "LBSEARCH_LSWA_BACKEND"


class Backend(NamedTuple):
    prefill: Callable
    decode: Callable
    decode_fmap: Callable  # decode with the Hedgehog feature map of q and k computed inside


def _torch_prefill(q, k, v, fq, fk, gate, window, sinks, scale, return_state, start):
    out = lswa_naive(q, k, v, fq, fk, gate, window, sinks, scale, start=start)
    if not return_state:
        return out
    return out, lswa_state_from_prefill(k.detach(), v.detach(), fk.detach(), window, sinks,
                                        start=start)


def _triton_prefill(q, k, v, fq, fk, gate, window, sinks, scale, return_state, start):
    from .chunk import lswa_chunk

    return lswa_chunk(q, k, v, fq, fk, gate, window, sinks, scale, return_state=return_state,
                      start=start)


def _triton_decode(q, k, v, fq, fk, gate, state, scale):
    from .fused_recurrent import lswa_decode_fused

    return lswa_decode_fused(q, k, v, fq, fk, gate, state, scale)


def _triton_decode_fmap(q, k, v, weight, gate, state, scale):
    from .fused_fmap import lswa_decode_fmap_fused

    return lswa_decode_fmap_fused(q, k, v, weight, gate, state, scale)


BACKENDS: dict[str, Backend] = {
    "torch": Backend(_torch_prefill, lswa_decode_naive, lswa_decode_fmap_naive),
    "triton": Backend(_triton_prefill, _triton_decode, _triton_decode_fmap),
}


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Name of the backend to use for tensors on ``device``."""
    return resolve("LSWA", ENV_VAR, backend, device)


def lswa(q, k, v, fq, fk, gate, window: int, sinks: int, scale: float | None = None,
         backend: str | None = None, return_state: bool = False,
         start: torch.Tensor | None = None):
    """LSWA over a sequence (see the package docstring); optionally also the decode state.

    ``start`` [B] (LongTensor, None = no padding): left-padding tokens per row. They take no part
    in the attention (sinks are the first real tokens), pad queries output zeros, and the decode
    state is that of each row prefilled alone, so a padded batch decodes like its rows.
    """
    impl = BACKENDS[resolve_backend(backend, q.device)]
    return impl.prefill(q, k, v, fq, fk, gate, window, sinks, scale, return_state, start)


def lswa_decode(q, k, v, fq, fk, gate, state: LSWAState, scale: float | None = None,
                backend: str | None = None):
    """One decode step for a batch; updates ``state`` in place and returns q's-shaped output."""
    impl = BACKENDS[resolve_backend(backend, q.device)]
    return impl.decode(q, k, v, fq, fk, gate, state, scale)


def lswa_decode_fmap(q, k, v, weight, gate, state: LSWAState, scale: float | None = None,
                     backend: str | None = None):
    """:func:`lswa_decode` with fq / fk the Hedgehog features of q / k under ``weight`` [Hkv, D, F/2]
    (``lbsearch.attention.lswa.HedgehogFeatureMap``), computed inside the decode step."""
    impl = BACKENDS[resolve_backend(backend, q.device)]
    return impl.decode_fmap(q, k, v, weight, gate, state, scale)
