"""The decode step's glue as few kernels: RMSNorm (+ residual add), q/k/v RoPE (+ per-head q/k norm,
+ KV-cache write), SiLU-gated MLP activation, and the LSWA Hedgehog feature map.

Shapes (one decode step, one token per row): hidden rows x [B, C]; a fused q/k/v projection
qkv [B, (H + 2 Hkv) D] laid out q heads, k heads, v heads; RoPE tables cos/sin [L, D] (the model's
own, indexed by each row's position pos [B]); a gate/up projection gu [B, 2I] (gate first).

Implementations: ``naive`` (PyTorch, HF's order of roundings, any device: the reference) and
``fused`` (Triton, one program per row or head). ``ops`` dispatches (Triton on CUDA when it
imports; ``LBSEARCH_FUSED_BACKEND`` or ``backend=`` override). Triton is imported lazily.
"""
from .naive import (
                    add_rmsnorm_naive,
                    feature_map_naive,
                    rmsnorm_naive,
                    rope_qkv_cache_naive,
                    rope_qkv_naive,
                    silu_mul_naive,
)
from .ops import (
                    add_rmsnorm,
                    feature_map,
                    resolve_backend,
                    rmsnorm,
                    rope_qkv,
                    rope_qkv_cache,
                    silu_mul,
)

__all__ = ["add_rmsnorm", "add_rmsnorm_naive", "feature_map", "feature_map_naive", "resolve_backend", "rmsnorm",
           "rmsnorm_naive", "rope_qkv", "rope_qkv_cache", "rope_qkv_cache_naive", "rope_qkv_naive", "silu_mul",
           "silu_mul_naive"]
