"""What every attention kind shares: q/k/v projection with the layer's own weights and RoPE,
and finding this layer's entry in a transformers ``Cache``."""
from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicLayer


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def project_qkv(attn, hidden_states: torch.Tensor, position_embeddings):
    """q [B,T,H,D], k and v [B,T,Hkv,D] from a Llama/Mistral/Qwen2/Qwen3 attention module.

    Applies the per-head q/k norms where the family has them (Qwen3) and RoPE from the model's
    ``(cos, sin)``, exactly as the original module does before its softmax.
    """
    b, t, _ = hidden_states.shape
    d = attn.head_dim
    q = attn.q_proj(hidden_states).view(b, t, -1, d)
    k = attn.k_proj(hidden_states).view(b, t, -1, d)
    v = attn.v_proj(hidden_states).view(b, t, -1, d)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = (x.unsqueeze(2) for x in position_embeddings)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    return q, k, v


def out_projection(o_proj, x: torch.Tensor) -> torch.Tensor:
    """``o_proj`` applied in float64 (for references)."""
    bias = None if o_proj.bias is None else o_proj.bias.double()
    return torch.nn.functional.linear(x.double(), o_proj.weight.double(), bias)


def scale_of(attn) -> float:
    """The attention module's softmax scale (its ``scaling``, else 1/sqrt(head_dim))."""
    return getattr(attn, "scaling", attn.head_dim ** -0.5)


def left_padding(mask, t: int) -> torch.Tensor | None:
    """Per-row count of left-padding tokens among the last ``t`` keys, from the attention mask a
    decoder layer receives (a 4-D bool or additive mask, or a 2-D 0/1 mask); None when no row is
    padded. Read from the last query, which is a real token under left padding."""
    if mask is None or not torch.is_tensor(mask):
        return None
    row = mask[:, 0, -1, -t:] if mask.dim() == 4 else mask[:, -t:]
    keep = row if row.dtype == torch.bool else (row > torch.finfo(row.dtype).min / 2 if mask.dim() == 4 else row > 0)
    start = (~keep).long().cumprod(-1).sum(-1)
    return None if not bool(start.any()) else start


def pick_cache(kwargs: dict):
    """The cache argument, named ``cache`` in newer transformers and ``past_key_values`` before."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def cache_layer(cache, layer_idx: int, layer_cls, **init):
    """This layer's entry in ``cache``, replaced by a ``layer_cls`` if it is another type.

    ``generate()`` builds a default cache of full KV layers; lswa and none layers swap their
    entry on first use, so ``generate()`` works on a modified model without extra arguments.
    """
    while len(cache.layers) <= layer_idx:
        cache.layers.append(DynamicLayer())
    layer = cache.layers[layer_idx]
    if not isinstance(layer, layer_cls):
        layer = cache.layers[layer_idx] = layer_cls(**init)
    return layer


class CountingCacheLayer(CacheLayerMixin):
    """A cache entry without a KV tensor: it counts tokens so the Cache reports the sequence
    length and mask sizes like a full KV layer would. Subclasses add their own state."""

    is_sliding = False

    def __init__(self, **kwargs):
        super().__init__()
        self.seen = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__} keeps no key/value tensors to update")

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

    def batch_select_indices(self, indices) -> None:
        pass

    def batch_repeat_interleave(self, repeats: int) -> None:
        pass

    def nbytes(self) -> int:
        return 0


RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})


def rms_norm_params(norm) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of an HF RMSNorm the fused kernels compute exactly (``weight * x / rms(x)``); None for
    any other module (the fused decode step calls such a module instead)."""
    if type(norm).__name__ in RMS_NORMS and isinstance(getattr(norm, "weight", None), torch.Tensor):
        return norm.weight, float(norm.variance_epsilon)
    return None


def qk_norm_params(attn) -> tuple[torch.Tensor | None, torch.Tensor | None, float] | None:
    """(q weight, k weight, eps) of the per-head q/k norms (Qwen3), (None, None, 0) without them, None when
    they are modules the fused kernels do not compute."""
    if getattr(attn, "q_norm", None) is None:
        return None, None, 0.0
    q, k = rms_norm_params(attn.q_norm), rms_norm_params(attn.k_norm)
    if q is None or k is None or q[1] != k[1]:
        return None
    return q[0], k[0], q[1]
