"""Decode attention over a preallocated KV cache: one new query per sequence.

Shapes: q [B, H, D]; k_cache and v_cache [B, Hkv, L, D] (L = allocated length); seq_lens [B]
(int, how many cache rows of each sequence are filled); query head h reads kv head h // (H // Hkv).
``o[b, h] = softmax(scale * q[b, h] . k[b, h // g, :seq_lens[b]]) @ v[b, h // g, :seq_lens[b]]``.

Implementations: ``naive`` (PyTorch reference, any device) and ``split_kv`` (Triton: the cache
length is split over programs, each reads its part once for all query heads of a GQA group, and
only the filled part is read; a second small kernel merges the parts). ``decode_attention``
dispatches (Triton on CUDA when it imports). Triton is imported lazily.
"""
from .naive import decode_attention_naive
from .ops import decode_attention, resolve_backend

__all__ = ["decode_attention", "decode_attention_naive", "resolve_backend"]
