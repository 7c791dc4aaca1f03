"""Fused Triton decode step of LSWA that also computes the Hedgehog feature map: one program per
(sequence, kv head), one launch per layer and step.

Same as ``fused_recurrent`` but it takes the feature map's weight [Hkv, D, F/2] instead of fq / fk:
phi(x) = [softmax(x W_h), softmax(-x W_h)] of the group's query heads and of the new key (one extra
row of the query block, so the block is next_power_of_2(group + 1) rows, at least 16) is computed
in registers (float32, from q / k as they come: bf16 or fp32), so the separate feature-map kernel and
the float32 round trip of fq / fk through memory are gone. The gate, the ring buffer, the sinks and the
linear state (fold of the token leaving the window) are handled in the same pass, as before. The
feature dimension is processed as its two halves (softmax(zW) and softmax(-zW)), which need no
concatenation: lin_s / lin_z / ring_fk rows [0, F/2) and [F/2, F).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fused_decode.fused import _phi
from ..triton_utils import dot as _dot
from . import fused_recurrent as fr
from .fused_recurrent import LOG2E, _attend_window, _write_token
from .naive import LSWAState


@triton.jit
def _decode_fmap_kernel(q, k, v, w, gate, sink_k, sink_v, ring_k, ring_v, ring_fk, lin_s, lin_z,
                        pos, tickets, o, SCALE2, W, S,
                        H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, F2: tl.constexpr,
                        BG: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BW: tl.constexpr,
                        BS: tl.constexpr, PREC: tl.constexpr):
    b, bh, p, slot, rg, rd, gok, dok, heads, q_off, q_mask, k_new, v_new, m, l, acc = _attend_window(
        q, k, v, sink_k, sink_v, ring_k, ring_v, pos, SCALE2, W, S, H, HKV, D, BG, BD, BW, BS, PREC)
    grp = H // HKV
    rf = tl.arange(0, BF)
    fok = rf < F2

    # feature map after the softmax part (nothing of it is live across the loop). q and k are read again
    # as they are in memory (a cache hit): the features are of the un-rounded inputs, as the module's.
    # The key rides in row grp of the query block (BG > grp), so one small product maps them all.
    is_k = (rg == grp)[:, None]
    x = tl.load(q + q_off, mask=q_mask, other=0.0).to(tl.float32)
    x = tl.where(is_k, tl.load(k + bh * D + rd, mask=dok, other=0.0).to(tl.float32)[None, :], x)
    hk = tl.program_id(1).to(tl.int64)
    wt = tl.load(w + hk * D * F2 + rd[:, None] * F2 + rf[None, :], mask=dok[:, None] & fok[None, :],
                 other=0.0).to(tl.float32)
    fq_p, fq_n = _phi(_dot(x, wt, "ieee"), fok[None, :])
    fk_p = tl.sum(tl.where(is_k, fq_p, 0.0), 0)
    fk_n = tl.sum(tl.where(is_k, fq_n, 0.0), 0)

    # fold the token leaving the window (j = p - W) into the linear state unless it is a sink
    st_p = (bh * 2 * F2 + rf)[:, None] * D + rd[None, :]  # rows of the positive half; + F2 * D: negative
    st_mask = fok[:, None] & dok[None, :]
    ls_p = tl.load(lin_s + st_p, mask=st_mask, other=0.0)
    ls_n = tl.load(lin_s + st_p + F2 * D, mask=st_mask, other=0.0)
    z_off = bh * 2 * F2 + rf
    lz_p = tl.load(lin_z + z_off, mask=fok, other=0.0)
    lz_n = tl.load(lin_z + z_off + F2, mask=fok, other=0.0)
    fk_off = (bh * W + slot) * 2 * F2 + rf
    old_p = tl.load(ring_fk + fk_off, mask=fok, other=0.0).to(tl.float32)
    old_n = tl.load(ring_fk + fk_off + F2, mask=fok, other=0.0).to(tl.float32)
    old_v = tl.load(ring_v + (bh * W + slot) * D + rd, mask=dok, other=0.0).to(tl.float32)
    fold = ((p - W) >= S).to(tl.float32)
    ls_p += fold * old_p[:, None] * old_v[None, :]
    ls_n += fold * old_n[:, None] * old_v[None, :]
    lz_p += fold * old_p
    lz_n += fold * old_n

    g = tl.load(gate + heads, mask=gok, other=0.5).to(tl.float32)
    lin_num = _dot(fq_p, ls_p, "ieee") + _dot(fq_n, ls_n, "ieee")
    lin_den = tl.sum(fq_p * lz_p[None, :], 1) + tl.sum(fq_n * lz_n[None, :], 1)
    num = g[:, None] * acc + (1 - g)[:, None] * lin_num
    den = tl.where(gok, g * l + (1 - g) * lin_den, 1.0)
    tl.store(o + q_off, (num / den[:, None]).to(o.dtype.element_ty), mask=q_mask)

    tl.debug_barrier()  # every read of the old slot is done before it is overwritten
    tl.store(ring_fk + fk_off, fk_p.to(ring_fk.dtype.element_ty), mask=fok)
    tl.store(ring_fk + fk_off + F2, fk_n.to(ring_fk.dtype.element_ty), mask=fok)
    fold_rows = fok & ((rf * 0 + p - W) >= S)
    tl.store(lin_s + st_p, ls_p, mask=st_mask & fold_rows[:, None])
    tl.store(lin_s + st_p + F2 * D, ls_n, mask=st_mask & fold_rows[:, None])
    tl.store(lin_z + z_off, lz_p, mask=fold_rows)
    tl.store(lin_z + z_off + F2, lz_n, mask=fold_rows)
    _write_token(k_new, v_new, sink_k, sink_v, ring_k, ring_v, pos, tickets, b, bh, p, slot, W, S, rd, dok,
                 D, HKV)


def lswa_decode_fmap_fused(q, k, v, weight, gate, state: LSWAState, scale: float | None = None,
                           num_warps: int = 4):
    """One decode step from q [B,H,D], k/v [B,Hkv,D] and the feature map's weight [Hkv, D, F/2] (see
    ``naive.lswa_decode_fmap_naive``). Updates ``state``; returns q's-shaped output in q's dtype."""
    b, h, d = q.shape
    hkv, f2 = k.shape[1], weight.shape[-1]
    if tuple(weight.shape) != (hkv, d, f2) or state.ring_fk.shape[-1] != 2 * f2:
        raise ValueError(f"lswa_decode_fmap: weight {tuple(weight.shape)} does not map [{hkv}, {d}] heads "
                         f"to the state's {state.ring_fk.shape[-1]} features")
    scale = d ** -0.5 if scale is None else float(scale)
    fr._check_state(state)
    q, k, v, weight = (x.contiguous() for x in (q, k, v, weight))
    o = fr._empty_like(q)
    w, s = state.window, state.sinks
    prec = "ieee" if state.ring_k.dtype == torch.float32 else "tf32"
    _decode_fmap_kernel[(b, hkv)](
        q, k, v, weight, gate.contiguous(), state.sink_k, state.sink_v, state.ring_k, state.ring_v,
        state.ring_fk, state.lin_s, state.lin_z, state.pos, fr._tickets(state.pos), o, scale * LOG2E, w, s,
        H=h, HKV=hkv, D=d, F2=f2, BG=max(16, triton.next_power_of_2(h // hkv + 1)),
        BD=max(16, triton.next_power_of_2(d)), BF=max(16, triton.next_power_of_2(f2)),
        BW=max(16, min(64, triton.next_power_of_2(w))), BS=max(16, triton.next_power_of_2(max(s, 1))),
        PREC=prec, num_warps=num_warps)
    return o
