"""Fused Triton decode step of LSWA: one program per (sequence, kv head).

Each program reads the sinks, the ring buffer's keys/values, the linear state and one ring_fk
row (the token leaving the window) once for all query heads of its group, writes the output and
updates the state in place: new token into its ring slot (and sink slot while pos < sinks), the
leaving token folded into lin_s / lin_z. Same math as ``lswa_decode_naive``; positions may
differ across the batch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_utils import dot as _dot

from .naive import LSWAState

LOG2E = 1.4426950408889634


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    """Uninitialised output; tests replace this with a NaN-filled one to catch unwritten output."""
    return torch.empty_like(x)


@triton.jit
def _step(qt, kt, vt, mask, m, l, acc, SCALE2, PREC: tl.constexpr):
    """Online softmax over one block of keys (log2 units)."""
    s = _dot(qt, tl.trans(kt), PREC) * SCALE2
    s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m - m_safe)
    acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, PREC)
    return m_new, l * alpha + tl.sum(p, 1), acc


@triton.jit
def _softmax_part(qt, k_new, v_new, sink_k, sink_v, ring_k, ring_v, bh, p, slot, W, S, gok, rd, dok, SCALE2,
                  D: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr, BW: tl.constexpr, BS: tl.constexpr,
                  PREC: tl.constexpr):
    """(m, l, acc): online softmax of the query block qt over the sinks outside the window and the ring,
    with the new token substituted into its slot (reads only: the caller writes the state)."""
    m = tl.full([BG], float("-inf"), tl.float32)
    l = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, BD], tl.float32)
    if S > 0:  # sinks that are outside the window
        js = tl.arange(0, BS)
        jok = (js < S) & (js <= p - W)
        off = (bh * S + js)[:, None] * D + rd[None, :]
        lmask = (js < S)[:, None] & dok[None, :]
        ks = tl.load(sink_k + off, mask=lmask, other=0.0)
        vs = tl.load(sink_v + off, mask=lmask, other=0.0)
        m, l, acc = _step(qt, ks, vs, jok[None, :] & gok[:, None], m, l, acc, SCALE2, PREC)
    for r0 in range(0, W, BW):  # ring, with the new token substituted into its slot
        r = r0 + tl.arange(0, BW)
        off = (bh * W + r)[:, None] * D + rd[None, :]
        lmask = (r < W)[:, None] & dok[None, :]
        is_new = (r == slot)[:, None]
        kr = tl.where(is_new, k_new[None, :], tl.load(ring_k + off, mask=lmask, other=0.0))
        vr = tl.where(is_new, v_new[None, :], tl.load(ring_v + off, mask=lmask, other=0.0))
        ok = (r < W) & (r <= p)
        m, l, acc = _step(qt, kr, vr, ok[None, :] & gok[:, None], m, l, acc, SCALE2, PREC)
    return m, l, acc


@triton.jit
def _attend_window(q, k, v, sink_k, sink_v, ring_k, ring_v, pos, SCALE2, W, S, H: tl.constexpr,
                   HKV: tl.constexpr, D: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr, BW: tl.constexpr,
                   BS: tl.constexpr, PREC: tl.constexpr):
    """The decode kernels' common start, for this program's (sequence b, kv head): its position and ring
    slot, the group's query block and the new token in the cache's dtype, and the online softmax of the
    block over the sinks and the ring (``_softmax_part``). Reads only."""
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64)
    grp = H // HKV
    bh = b * HKV + hk
    p = tl.load(pos + b)
    slot = p % W
    rg, rd = tl.arange(0, BG), tl.arange(0, BD)
    gok, dok = rg < grp, rd < D
    heads = hk * grp + rg
    q_off = (b * H + heads)[:, None] * D + rd[None, :]
    q_mask = gok[:, None] & dok[None, :]
    qt = tl.load(q + q_off, mask=q_mask, other=0.0).to(ring_k.dtype.element_ty)
    k_new = tl.load(k + bh * D + rd, mask=dok, other=0.0).to(ring_k.dtype.element_ty)
    v_new = tl.load(v + bh * D + rd, mask=dok, other=0.0).to(ring_v.dtype.element_ty)
    m, l, acc = _softmax_part(qt, k_new, v_new, sink_k, sink_v, ring_k, ring_v, bh, p, slot, W, S, gok, rd,
                              dok, SCALE2, D, BG, BD, BW, BS, PREC)
    return b, bh, p, slot, rg, rd, gok, dok, heads, q_off, q_mask, k_new, v_new, m, l, acc


@triton.jit
def _write_token(k_new, v_new, sink_k, sink_v, ring_k, ring_v, pos, tickets, b, bh, p, slot, W, S, rd, dok,
                 D: tl.constexpr, HKV: tl.constexpr):
    """The new token into its ring slot (and its sink slot while pos < sinks); pos[b] += 1 by the last of
    the sequence's HKV programs. Call after a barrier: the old slot must have been read by every thread."""
    tl.store(ring_k + (bh * W + slot) * D + rd, k_new, mask=dok)
    tl.store(ring_v + (bh * W + slot) * D + rd, v_new, mask=dok)
    if S > 0:
        sink_row = (bh * S + p) * D + rd
        is_sink = dok & ((rd * 0 + p) < S)  # tensor masks: the interpreter rejects scalar ones
        tl.store(sink_k + sink_row, k_new.to(sink_k.dtype.element_ty), mask=is_sink)
        tl.store(sink_v + sink_row, v_new.to(sink_v.dtype.element_ty), mask=is_sink)
    # every program read pos before taking its ticket (acq_rel), so nobody can still need the old value
    if tl.atomic_add(tickets + b, 1, sem="acq_rel") == HKV - 1:
        tl.store(pos + b, p + 1)
        tl.store(tickets + b, 0)


@triton.jit
def _decode_kernel(q, k, v, fq, fk, gate, sink_k, sink_v, ring_k, ring_v, ring_fk, lin_s, lin_z,
                   pos, tickets, o, SCALE2, W, S,
                   H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
                   BG: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BW: tl.constexpr,
                   BS: tl.constexpr, PREC: tl.constexpr):
    b, bh, p, slot, rg, rd, gok, dok, heads, q_off, q_mask, k_new, v_new, m, l, acc = _attend_window(
        q, k, v, sink_k, sink_v, ring_k, ring_v, pos, SCALE2, W, S, H, HKV, D, BG, BD, BW, BS, PREC)
    rf = tl.arange(0, BF)
    fok = rf < F
    fk_new = tl.load(fk + bh * F + rf, mask=fok, other=0.0)

    # fold the token leaving the window (j = p - W) into the linear state unless it is a sink.
    # (Loading this state before the softmax part keeps it live across it: spills, measured slower.)
    st_off = bh * F * D + rf[:, None] * D + rd[None, :]
    st_mask = fok[:, None] & dok[None, :]
    ls = tl.load(lin_s + st_off, mask=st_mask, other=0.0)
    lz = tl.load(lin_z + bh * F + rf, mask=fok, other=0.0)
    old_fk = tl.load(ring_fk + (bh * W + slot) * F + rf, mask=fok, other=0.0).to(tl.float32)
    old_v = tl.load(ring_v + (bh * W + slot) * D + rd, mask=dok, other=0.0).to(tl.float32)
    fold = ((p - W) >= S).to(tl.float32)
    ls += fold * old_fk[:, None] * old_v[None, :]
    lz += fold * old_fk
    g = tl.load(gate + heads, mask=gok, other=0.5).to(tl.float32)
    fqt = tl.load(fq + (b * H + heads)[:, None] * F + rf[None, :], mask=gok[:, None] & fok[None, :],
                  other=0.0).to(tl.float32)
    num = g[:, None] * acc + (1 - g)[:, None] * _dot(fqt, ls, "ieee")
    den = tl.where(gok, g * l + (1 - g) * tl.sum(fqt * lz[None, :], 1), 1.0)
    tl.store(o + q_off, (num / den[:, None]).to(o.dtype.element_ty), mask=q_mask)

    tl.debug_barrier()  # every read of the old slot is done before it is overwritten
    tl.store(ring_fk + (bh * W + slot) * F + rf, fk_new.to(ring_fk.dtype.element_ty), mask=fok)
    fold_rows = fok & ((rf * 0 + p - W) >= S)
    tl.store(lin_s + st_off, ls, mask=st_mask & fold_rows[:, None])
    tl.store(lin_z + bh * F + rf, lz, mask=fold_rows)
    _write_token(k_new, v_new, sink_k, sink_v, ring_k, ring_v, pos, tickets, b, bh, p, slot, W, S, rd, dok,
                 D, HKV)


_TICKETS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _tickets(pos: torch.Tensor) -> torch.Tensor:
    """Per-sequence arrival counters (all zero between calls), cached per device and batch.
    Decode steps of the same batch size must not run concurrently on different streams."""
    key = (pos.device, pos.numel())
    if key not in _TICKETS:
        _TICKETS[key] = torch.zeros(pos.numel(), dtype=torch.int32, device=pos.device)
    return _TICKETS[key]


def _check_state(state: LSWAState) -> None:
    """The kernel indexes the state tensors as contiguous buffers."""
    for name, t in vars(state).items():
        if not t.is_contiguous():
            raise ValueError(f"LSWAState.{name} must be contiguous")


def lswa_decode_fused(q, k, v, fq, fk, gate, state: LSWAState, scale: float | None = None,
                      num_warps: int = 4):
    """One decode step: q [B,H,D], k/v [B,Hkv,D], fq [B,H,F], fk [B,Hkv,F]. Updates ``state``."""
    b, h, d = q.shape
    hkv, f = k.shape[1], fk.shape[-1]
    scale = d ** -0.5 if scale is None else float(scale)
    _check_state(state)
    q, k, v, fq, fk = (x.contiguous() for x in (q, k, v, fq, fk))
    o = _empty_like(q)
    w, s = state.window, state.sinks
    prec = "ieee" if state.ring_k.dtype == torch.float32 else "tf32"
    bw = min(64, triton.next_power_of_2(w))
    _decode_kernel[(b, hkv)](
        q, k, v, fq, fk, gate.contiguous(), state.sink_k, state.sink_v, state.ring_k, state.ring_v,
        state.ring_fk, state.lin_s, state.lin_z, state.pos, _tickets(state.pos), o, scale * LOG2E,
        w, s,
        H=h, HKV=hkv, D=d, F=f, BG=max(16, triton.next_power_of_2(h // hkv)),
        BD=max(16, triton.next_power_of_2(d)), BF=max(16, triton.next_power_of_2(f)),
        BW=max(16, bw), BS=max(16, triton.next_power_of_2(max(s, 1))), PREC=prec,
        num_warps=num_warps)
    return o
