"""``softmax``: the layer's original attention, untouched (full KV cache)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicLayer

from ..kernels.decode_attention import decode_attention
from .base import AttentionKind
from .common import out_projection, project_qkv, qk_norm_params, scale_of


def build(attn: nn.Module, spec) -> nn.Module:
    return attn


class SoftmaxRunner:
    """Decode engine: full KV cache; prefill with causal SDPA, decode with the split-KV kernel."""

    def __init__(self, layer, batch: int, max_len: int, like: torch.Tensor):
        self.attn = layer.self_attn
        kv_heads = self.attn.k_proj.out_features // self.attn.head_dim
        shape = (batch, kv_heads, max_len, self.attn.head_dim)
        self.k = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.v = torch.zeros_like(self.k)
        self.proj = self.attn  # the module holding q/k/v/o_proj (the fused step projects)
        self.heads, self.kv_heads = self.attn.q_proj.out_features // self.attn.head_dim, kv_heads
        self._qk_norm = qk_norm_params(self.attn)

    def prefill(self, x, rows, cos_sin, start=None):
        """Rows ``rows`` of the cache from x [n, T, C]; ``start`` [n]: left pads per row (masked out
        as keys, and the cache keeps only real tokens, from row 0: each row in its own token space)."""
        q, k, v = (y.transpose(1, 2) for y in project_qkv(self.attn, x, cos_sin))
        t = x.shape[1]
        mask = None if start is None else padding_mask(start, t)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             scale=scale_of(self.attn), enable_gqa=True)
        if start is not None:
            k, v = shift_left(k, start), shift_left(v, start)
        self.k[rows, :, :t] = k
        self.v[rows, :, :t] = v
        return self.attn.o_proj(out.transpose(1, 2).flatten(2))

    def decode(self, x, pos, cos_sin):
        q, k, v = project_qkv(self.attn, x, cos_sin)
        rows = torch.arange(x.shape[0], device=x.device)
        self.k[rows, :, pos] = k[:, 0]
        self.v[rows, :, pos] = v[:, 0]
        out = decode_attention(q[:, 0], self.k, self.v, pos + 1, scale_of(self.attn))
        return self.attn.o_proj(out.reshape(x.shape[0], 1, -1))

    def can_fuse(self) -> bool:
        """Whether :meth:`fused_decode` computes this layer (its q/k norms, if any, are plain RMSNorms)."""
        return self._qk_norm is not None

    def fused_decode(self, qkv, step, ops):
        """Attention output [B, H*D] from the fused projection qkv [B, (H + 2 Hkv) D]: RoPE (+ q/k norm) and
        the cache write in one op, then split-KV decode attention; ``step``: (pos, lens, cos, sin)."""
        qn, kn, eps = self._qk_norm
        q = ops.rope_qkv_cache(qkv, step.cos, step.sin, step.pos, self.heads, self.kv_heads, self.k, self.v,
                               qn, kn, eps)
        return ops.decode_attention(q, self.k, self.v, step.lens, scale_of(self.attn)).flatten(1)

    def state(self) -> list[torch.Tensor]:
        return []  # rows past the prompt are rewritten by every decode, rows before by nobody

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def padding_mask(start: torch.Tensor, t: int) -> torch.Tensor:
    """Boolean [n, 1, t, t]: causal attention to real keys only. A pad query sees itself alone, so no
    row is empty (its output is never used, but NaN would reach the next layer's pads)."""
    i = torch.arange(t, device=start.device)[:, None]
    j = torch.arange(t, device=start.device)[None]
    return (((j <= i) & (j >= start.view(-1, 1, 1))) | (i == j))[:, None]


def shift_left(x: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """x [n, H, t, D] with row b moved left by start[b] (its real tokens from index 0; the tail repeats
    the last token and is overwritten by decoding before it is read)."""
    t = x.shape[2]
    idx = (torch.arange(t, device=x.device)[None] + start[:, None]).clamp_max(t - 1)
    return x.gather(2, idx[:, None, :, None].expand_as(x))


def kv_bytes(shape, spec, context: int) -> int:
    return 2 * shape.kv_heads * context * shape.head_dim * shape.dtype_bytes


def decode_traffic(shape, spec, batch: int, context: int) -> tuple[float, float]:
    """Every cached key and value is read; q.k and p.v over the whole context."""
    return batch * kv_bytes(shape, spec, context), 4 * batch * shape.heads * context * shape.head_dim


def reference(attn, hidden: torch.Tensor, cos_sin) -> torch.Tensor:
    """Causal softmax attention written out (float64), query heads sharing their group's key/value."""
    q, k, v = (x.double() for x in project_qkv(attn, hidden, cos_sin))
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale_of(attn)
    t = q.shape[1]
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    out = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)
    return out_projection(attn.o_proj, out.flatten(2))


KIND = AttentionKind(
    name="softmax", letter="S", build=build, cache_layer=DynamicLayer, runner=SoftmaxRunner,
    kv_bytes=kv_bytes, decode_traffic=decode_traffic, prefill_span=lambda spec, prompt_len: prompt_len / 2,
    reference=reference,
)
