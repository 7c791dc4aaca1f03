"""``none``: the attention sub-block is removed; the residual stream passes through."""
from __future__ import annotations

import torch
from torch import nn

from ..plan import LayerSpec
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


def build(attn: nn.Module, spec: LayerSpec) -> nn.Module:
    return NoAttention(attn.layer_idx)
