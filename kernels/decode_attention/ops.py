"""Backend dispatch for decode attention: "torch" (reference), "triton" (split_kv) or "auto"."""
from __future__ import annotations

from typing import Callable

import torch

from ..backend import resolve
from .naive import decode_attention_naive

ENV_VAR = "LBSEARCH_DECODE_ATTN_BACKEND"


def _triton(q, k_cache, v_cache, seq_lens, scale):
    from .split_kv import decode_attention_split_kv

    return decode_attention_split_kv(q, k_cache, v_cache, seq_lens, scale)


BACKENDS: dict[str, Callable] = {"torch": decode_attention_naive, "triton": _triton}


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend name for tensors on ``device`` (``None``: the env var, else "auto")."""
    return resolve("decode-attention", ENV_VAR, backend, device)


def decode_attention(q, k_cache, v_cache, seq_lens, scale: float | None = None, backend: str | None = None):
    """Attention of one query per sequence over the filled part of its cache (package docstring)."""
    return BACKENDS[resolve_backend(backend, q.device)](q, k_cache, v_cache, seq_lens, scale)
