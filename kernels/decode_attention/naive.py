"""PyTorch reference for decode attention (see the package docstring); works on any device."""
from __future__ import annotations

import torch


def decode_attention_naive(q, k_cache, v_cache, seq_lens, scale: float | None = None):
    """o [B, H, D] from q [B, H, D], k/v cache [B, Hkv, L, D] and filled lengths seq_lens [B]."""
    b, h, d = q.shape
    hkv, length = k_cache.shape[1], k_cache.shape[2]
    scale = d ** -0.5 if scale is None else scale
    qg = q.view(b, hkv, h // hkv, d).to(k_cache.dtype)
    acc = torch.promote_types(k_cache.dtype, torch.float32)
    scores = torch.einsum("bkgd,bkld->bkgl", qg, k_cache).to(acc) * scale
    filled = torch.arange(length, device=q.device)[None, :] < seq_lens.to(q.device)[:, None]
    scores = scores.masked_fill(~filled[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    out = torch.einsum("bkgl,bkld->bkgd", probs.to(v_cache.dtype), v_cache)
    return out.reshape(b, h, d).to(q.dtype)
