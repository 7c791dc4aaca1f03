"""``none``: the attention sub-block is removed; the residual stream passes through."""
from __future__ import annotations

import torch
from torch import nn

from .base import AttentionKind, no_traffic
from .common import CountingCacheLayer, cache_layer, pick_cache


class PassThroughCacheLayer(CountingCacheLayer):
    """Stores nothing."""


class NoAttention(nn.Module):
    """Returns zeros, so the decoder layer adds nothing from attention."""

    kind = "none"

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        cache = pick_cache(kwargs)
        if cache is not None:
            cache_layer(cache, self.layer_idx, PassThroughCacheLayer).seen += hidden_states.shape[1]
        return torch.zeros_like(hidden_states), None


def build(attn: nn.Module, spec) -> nn.Module:
    return NoAttention(attn.layer_idx)


class NoneRunner:
    """Decode engine: no attention, no cache (the engine skips the layer's norm and attention)."""

    def __init__(self, layer, batch: int, max_len: int, like: torch.Tensor):
        pass

    def state(self) -> list[torch.Tensor]:
        return []

    def nbytes(self) -> int:
        return 0


KIND = AttentionKind(
    name="none", letter="N", build=build, cache_layer=PassThroughCacheLayer, runner=NoneRunner, attends=False,
    kv_bytes=lambda shape, spec, context: 0, decode_traffic=no_traffic, prefill_span=lambda spec, prompt_len: 0.0,
    reference=lambda module, hidden, cos_sin: torch.zeros_like(hidden, dtype=torch.float64),
)
