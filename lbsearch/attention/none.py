"""``none``: the attention sub-block is removed; the residual stream passes through."""
from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import CacheLayerMixin

from ..plan import LayerSpec
from .common import cache_layer, pick_cache


class PassThroughCacheLayer(CacheLayerMixin):
    """Stores nothing; counts tokens so the cache reports the sequence length like a KV layer."""

    is_sliding = False

    def __init__(self, **kwargs):
        super().__init__()
        self.seen = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("a removed attention layer has no keys or values to cache")

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen = 0

    def reorder_cache(self, beam_idx) -> None:
        pass

    def batch_repeat_interleave(self, repeats: int) -> None:
        pass

    def batch_select_indices(self, indices) -> None:
        pass

    def nbytes(self) -> int:
        return 0


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
