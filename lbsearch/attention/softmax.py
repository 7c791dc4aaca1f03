"""``softmax``: the layer's original attention, untouched (full KV cache)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicLayer

from ..kernels.decode_attention import decode_attention
from .base import AttentionKind
from .common import out_projection, project_qkv, scale_of


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

    def prefill(self, x, rows: slice, cos_sin):
        q, k, v = project_qkv(self.attn, x, cos_sin)
        t = x.shape[1]
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        self.k[rows, :, :t] = k
        self.v[rows, :, :t] = v
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True,
                                             scale=scale_of(self.attn), enable_gqa=True)
        return self.attn.o_proj(out.transpose(1, 2).flatten(2))

    def decode(self, x, pos, cos_sin):
        q, k, v = project_qkv(self.attn, x, cos_sin)
        rows = torch.arange(x.shape[0], device=x.device)
        self.k[rows, :, pos] = k[:, 0]
        self.v[rows, :, pos] = v[:, 0]
        out = decode_attention(q[:, 0], self.k, self.v, pos + 1, scale_of(self.attn))
        return self.attn.o_proj(out.reshape(x.shape[0], 1, -1))

    def state(self) -> list[torch.Tensor]:
        return []  # rows past the prompt are rewritten by every decode, rows before by nobody

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


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
