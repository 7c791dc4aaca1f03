"""Backend dispatch of the fused decode glue: "torch" (naive), "triton" (fused) or "auto".

``backend=None``: the environment variable ``LBSEARCH_FUSED_BACKEND``, else "auto" (Triton when the
tensors are on CUDA and Triton imports).
"""
from __future__ import annotations

import torch

from ..backend import resolve
from . import naive

ENV_VAR = "LBSEARCH_FUSED_BACKEND"


def resolve_backend(backend: str | None, device: torch.device) -> str:
    return resolve("fused-decode", ENV_VAR, backend, device)


def _impl(name: str, backend: str | None, device):
    if resolve_backend(backend, device) == "torch":
        return getattr(naive, f"{name}_naive")
    from . import fused

    return getattr(fused, f"{name}_fused")


def rmsnorm(x, weight, eps: float, backend: str | None = None):
    return _impl("rmsnorm", backend, x.device)(x, weight, eps)


def add_rmsnorm(x, delta, weight, eps: float, backend: str | None = None):
    return _impl("add_rmsnorm", backend, x.device)(x, delta, weight, eps)


def rope_qkv(qkv, cos, sin, pos, heads: int, kv_heads: int, q_norm=None, k_norm=None, eps: float = 0.0,
             backend: str | None = None):
    return _impl("rope_qkv", backend, qkv.device)(qkv, cos, sin, pos, heads, kv_heads, q_norm, k_norm, eps)


def rope_qkv_cache(qkv, cos, sin, pos, heads: int, kv_heads: int, k_cache, v_cache, q_norm=None, k_norm=None,
                   eps: float = 0.0, backend: str | None = None):
    return _impl("rope_qkv_cache", backend, qkv.device)(qkv, cos, sin, pos, heads, kv_heads, k_cache, v_cache,
                                                        q_norm, k_norm, eps)


def silu_mul(gu, backend: str | None = None):
    return _impl("silu_mul", backend, gu.device)(gu)


def feature_map(q, k, weight, backend: str | None = None):
    return _impl("feature_map", backend, q.device)(q, k, weight)
