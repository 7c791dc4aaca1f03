"""``torch.library`` custom ops around the Triton kernels, so ``torch.compile`` composes the decode step
around them (inductor fuses the elementwise glue; the kernels stay opaque calls) and the compiled step
is still captured in the engine's CUDA graph.

Each op's body is the kernels' dispatcher: Triton on CUDA, the PyTorch reference elsewhere (so the
compiled path also runs, and is tested, on CPU). Ops that update caches or states declare them in
``mutates_args``; their fake (meta) implementations give the output shapes. Imported only when an
engine compiles its step.
"""

from typing import Optional  # noqa: UP035 - custom_op schema inference on older torch

import torch
from torch import Tensor

from .fused import Ops, use_fmap_kernel
from .kernels import fused_decode as fd
from .kernels.decode_attention import decode_attention as _decode_attention
from .kernels.lswa import LSWAState
from .kernels.lswa import lswa_decode as _lswa_decode
from .kernels.lswa import lswa_decode_fmap as _lswa_decode_fmap
from .kernels.top_p import top_p_wide_rows as _top_p_wide_rows

LIB = "lbsearch"


@torch.library.custom_op(f"{LIB}::decode_attention", mutates_args=())
def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Tensor, scale: float) -> Tensor:
    return _decode_attention(q, k_cache, v_cache, seq_lens, scale)


@decode_attention.register_fake
def _(q, k_cache, v_cache, seq_lens, scale):
    return torch.empty_like(q)


@torch.library.custom_op(f"{LIB}::rope_qkv_cache", mutates_args=("k_cache", "v_cache"))
def rope_qkv_cache(qkv: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, heads: int, kv_heads: int, k_cache: Tensor,
                   v_cache: Tensor, q_norm: Optional[Tensor], k_norm: Optional[Tensor], eps: float) -> Tensor:  # noqa: UP045
    return fd.rope_qkv_cache(qkv, cos, sin, pos, heads, kv_heads, k_cache, v_cache, q_norm, k_norm, eps)


@rope_qkv_cache.register_fake
def _(qkv, cos, sin, pos, heads, kv_heads, k_cache, v_cache, q_norm, k_norm, eps):
    return qkv.new_empty(qkv.shape[0], heads, qkv.shape[-1] // (heads + 2 * kv_heads))


@torch.library.custom_op(f"{LIB}::feature_map", mutates_args=())
def feature_map(q: Tensor, k: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    return fd.feature_map(q, k, weight)


@feature_map.register_fake
def _(q, k, weight):
    dt = torch.promote_types(q.dtype, torch.float32)
    f = 2 * weight.shape[-1]
    return q.new_empty(*q.shape[:2], f, dtype=dt), k.new_empty(*k.shape[:2], f, dtype=dt)


STATE = ("sink_k", "sink_v", "ring_k", "ring_v", "ring_fk", "lin_s", "lin_z", "pos")


@torch.library.custom_op(f"{LIB}::lswa_decode", mutates_args=STATE)
def lswa_decode(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, gate: Tensor, sink_k: Tensor,
                sink_v: Tensor, ring_k: Tensor, ring_v: Tensor, ring_fk: Tensor, lin_s: Tensor, lin_z: Tensor,
                pos: Tensor, scale: float) -> Tensor:
    state = LSWAState(sink_k, sink_v, ring_k, ring_v, ring_fk, lin_s, lin_z, pos)
    return _lswa_decode(q, k, v, fq, fk, gate, state, scale)


@lswa_decode.register_fake
def _(q, k, v, fq, fk, gate, sink_k, sink_v, ring_k, ring_v, ring_fk, lin_s, lin_z, pos, scale):
    return torch.empty_like(q)


@torch.library.custom_op(f"{LIB}::lswa_decode_fmap", mutates_args=STATE)
def lswa_decode_fmap(q: Tensor, k: Tensor, v: Tensor, weight: Tensor, gate: Tensor, sink_k: Tensor, sink_v: Tensor,
                     ring_k: Tensor, ring_v: Tensor, ring_fk: Tensor, lin_s: Tensor, lin_z: Tensor, pos: Tensor,
                     scale: float) -> Tensor:
    state = LSWAState(sink_k, sink_v, ring_k, ring_v, ring_fk, lin_s, lin_z, pos)
    return _lswa_decode_fmap(q, k, v, weight, gate, state, scale)


@lswa_decode_fmap.register_fake
def _(q, k, v, weight, gate, sink_k, sink_v, ring_k, ring_v, ring_fk, lin_s, lin_z, pos, scale):
    return torch.empty_like(q)


@torch.library.custom_op(f"{LIB}::top_p_wide_rows", mutates_args=("tokens",))
def top_p_wide_rows(probs: Tensor, log_u: Tensor, fits: Tensor, tokens: Tensor, bound: int) -> None:
    _top_p_wide_rows(probs, log_u, fits, tokens, bound)


@top_p_wide_rows.register_fake
def _(probs, log_u, fits, tokens, bound):
    return None


def _lswa(q, k, v, fq, fk, gate, st: LSWAState, scale, backend=None):
    return lswa_decode(q, k, v, fq, fk, gate, *(getattr(st, n) for n in STATE), scale)


def _lswa_fmap(q, k, v, weight, gate, st: LSWAState, scale, backend=None):
    return lswa_decode_fmap(q, k, v, weight, gate, *(getattr(st, n) for n in STATE), scale)


def compile_ops(fmap_in_decode: bool | None = None) -> Ops:
    """Ops for a compiled step: the Triton kernels as custom ops, norms / RoPE without a cache write /
    the MLP activation as the PyTorch references (inductor fuses them with their neighbours)."""
    return Ops(fd.rmsnorm_naive, fd.add_rmsnorm_naive, fd.silu_mul_naive, fd.rope_qkv_naive, rope_qkv_cache,
               feature_map, decode_attention, _lswa, _lswa_fmap if use_fmap_kernel(fmap_in_decode) else None)
