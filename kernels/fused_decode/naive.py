"""PyTorch references of the fused decode glue (see the package docstring).

Each computes exactly what the eager model does (HF's RMSNorm, ``q * cos + rotate_half(q) * sin``,
``act(gate) * up``, :class:`lbsearch.attention.lswa.HedgehogFeatureMap`), with the same roundings
in low precision, so the fused kernels are checked against the model's own arithmetic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rmsnorm_naive(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm over the last dim: float32 statistics, the normalised row cast back, times weight."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def add_rmsnorm_naive(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + delta, rmsnorm(x + delta)): a residual add followed by the next norm."""
    total = x + delta
    return total, rmsnorm_naive(total, weight, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def split_qkv(qkv: torch.Tensor, heads: int, kv_heads: int):
    """Views q [B, H, D], k and v [B, Hkv, D] of a fused projection [B, (H + 2 Hkv) D]."""
    b = qkv.shape[0]
    d = qkv.shape[-1] // (heads + 2 * kv_heads)
    q, k, v = qkv.view(b, heads + 2 * kv_heads, d).split([heads, kv_heads, kv_heads], 1)
    return q, k, v


def rope_qkv_naive(qkv, cos, sin, pos, heads: int, kv_heads: int, q_norm=None, k_norm=None, eps: float = 0.0):
    """Roped q [B, H, D], roped k and v [B, Hkv, D] (new tensors) from qkv [B, (H + 2 Hkv) D]; rows at
    positions ``pos`` [B] of the tables cos/sin [L, D]; per-head RMSNorm weights q_norm/k_norm [D] first
    (Qwen3) when given."""
    q, k, v = split_qkv(qkv, heads, kv_heads)
    if q_norm is not None:
        q, k = rmsnorm_naive(q, q_norm, eps), rmsnorm_naive(k, k_norm, eps)
    c, s = cos[pos][:, None], sin[pos][:, None]
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s, v.contiguous()


def rope_qkv_cache_naive(qkv, cos, sin, pos, heads: int, kv_heads: int, k_cache, v_cache, q_norm=None, k_norm=None,
                         eps: float = 0.0):
    """:func:`rope_qkv_naive`, with k and v written to row ``pos[b]`` of caches [B, Hkv, L, D]; returns q."""
    q, k, v = rope_qkv_naive(qkv, cos, sin, pos, heads, kv_heads, q_norm, k_norm, eps)
    rows = torch.arange(qkv.shape[0], device=qkv.device)
    k_cache[rows, :, pos] = k.to(k_cache.dtype)
    v_cache[rows, :, pos] = v.to(v_cache.dtype)
    return q


def silu_mul_naive(gu: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up from gu [B, 2I] (gate first), as LlamaMLP computes it."""
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


def feature_map_naive(q: torch.Tensor, k: torch.Tensor, weight: torch.Tensor):
    """(fq [B, H, F], fk [B, Hkv, F]): phi(x) = [softmax(x W_h), softmax(-x W_h)] in at least float32 with
    W_h = weight[h // group] [D, F/2] (HedgehogFeatureMap on one token)."""

    def phi(x):
        b, h, d = x.shape
        kv = weight.shape[0]
        dt = torch.promote_types(x.dtype, torch.float32)
        z = torch.einsum("bkgd,kdf->bkgf", x.to(dt).view(b, kv, h // kv, d), weight.to(dt))
        return torch.cat([z.softmax(-1), (-z).softmax(-1)], -1).view(b, h, -1)

    return phi(q), phi(k)
