"""Linear sliding-window attention (LSWA) ops.

Definition (shared by every implementation here). For query position i and key j <= i,
with a_ij = scale * q_i . k_j:

* softmax set  S_i = {j < sinks} U {i - window < j <= i}
* linear set   L_i = {sinks <= j <= i - window}
* m_i = max_{j in S_i} a_ij  (part of the function: it is not shift-invariant, keep its gradient)
* o_i = (g * sum_S exp(a_ij - m_i) v_j + (1 - g) * sum_L (fq_i . fk_j) v_j)
        / (g * sum_S exp(a_ij - m_i)   + (1 - g) * sum_L (fq_i . fk_j))

where g in (0, 1) is a per-query-head gate and fq / fk are non-negative feature maps of q / k.
Shapes: q [B, T, H, D], k and v [B, T, Hkv, D], fq [B, T, H, F], fk [B, T, Hkv, F], gate [H];
query head h reads kv head h // (H // Hkv).

Left padding: with ``start`` [B], row b's tokens j < start[b] do not exist. Its sinks are its
first real tokens: S_i = {s <= j < s + sinks} U {max(s, i - window + 1) <= j <= i} and
L_i = {s + sinks <= j <= i - window} with s = start[b]; pad queries (i < s) output 0.

Implementations: ``naive`` (PyTorch reference), ``chunk`` (Triton forward/backward, O(T)),
``fused_recurrent`` (Triton decode step), ``fused_fmap`` (the decode step with the Hedgehog feature
map of q and k inside); ``ops.lswa`` / ``ops.lswa_decode`` / ``ops.lswa_decode_fmap`` dispatch.
Triton is imported lazily, so this package works without it.
"""
from .naive import LSWAState, lswa_decode_fmap_naive, lswa_decode_naive, lswa_naive, lswa_state_from_prefill
from .ops import lswa, lswa_decode, lswa_decode_fmap, resolve_backend

__all__ = ["LSWAState", "lswa", "lswa_decode", "lswa_decode_fmap", "lswa_decode_fmap_naive", "lswa_decode_naive",
           "lswa_naive", "lswa_state_from_prefill", "resolve_backend"]
