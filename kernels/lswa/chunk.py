"""Chunked Triton forward and backward of LSWA (training and prefill), O(T) in sequence length.

Work layout, with C = chunk size (query blocks and key blocks are both C tokens):

* prefix state ``H[c] = sum fk_j (x) v_j`` and ``z[c] = sum fk_j`` over ``sinks <= j < c*C``
  (fp32, per kv head; GQA heads share it).
* query block ``qb`` reads ``H[c0]`` with ``c0 = max(0, qb - K)``, ``K = ceil((window-1)/C)``:
  every key below ``c0*C`` is linear for all its queries. Keys in ``[c0*C, qb*C + C)`` are done
  exactly (softmax with an online max, then the masked linear part), and sinks below ``c0*C`` as
  one extra softmax block. So a query block touches ``window/C + 2`` key blocks.
* the max ``m_i`` is part of the function: its gradient ``dm_i = -sum_S P dP`` goes to the score
  that attained it (the forward stores the arg-max, as torch's ``amax`` backward does).

Backward recomputes ``H`` and scores. Its kernels: dq/dfq (+ dm, delta, dgate per query),
the reverse state gradient ``G[c]`` (queries whose prefix holds chunk c), the sinks' gradient
from far queries (split over the sequence, summed in torch), and dk/dv/dfk per key block.
Masks, blocks and scores are shared by construction between forward and backward.

Left padding (``start``, per row S0): keys below S0 are masked everywhere (prefix states too) and
the sinks sit at S0..S0+sinks-1, possibly in any block; without ``start`` the kernels are compiled
with S0 = 0 (HAS_START=False) and nothing is loaded. Masked scores never reach exp2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_utils import dot as _dot

from .naive import LSWAState, fold_linear, window_state

LOG2E = 1.4426950408889634
BWD_WARPS = 4  # measured on H200 (T=32k fwd+bwd): 4 warps 24.4 ms, 8 warps 33.6 ms


def _empty(*shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Uninitialised buffer; tests replace this with a NaN-filled one to catch unwritten output."""
    return torch.empty(*shape, device=like.device, dtype=dtype or like.dtype)


@triton.jit
def _tile(base, rows, row_stride, cols, row_ok, n_cols):
    """Load a [rows, cols] tile (zeros outside)."""
    return tl.load(base + rows[:, None] * row_stride + cols[None, :],
                   mask=row_ok[:, None] & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _soft_step(qt, kt, vt, keys, mask, m, l, acc, am, SCALE2, PREC: tl.constexpr):
    """One online-softmax block (log2 units); also tracks the arg-max key of each row."""
    s = _dot(qt, tl.trans(kt), PREC) * SCALE2
    s = tl.where(mask, s, float("-inf"))
    bm = tl.max(s, 1)
    barg = tl.argmax(s, 1)
    best = tl.sum(tl.where(tl.arange(0, s.shape[1])[None, :] == barg[:, None], keys[None, :], 0), 1)
    am = tl.where(bm > m, best, am)
    m_new = tl.maximum(m, bm)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, PREC)
    return m_new, l, acc, am


@triton.jit
def _soft_mask(i, j, T, WINDOW, SINKS, S0):
    """Softmax set: causal and (in the window or a sink); keys j < S0 (left padding) do not exist.
    The padding bound is folded into 1-D terms: no more 2-D work than without padding."""
    lo = tl.maximum(i - WINDOW, S0 - 1)  # window keys are > lo
    sink = (j >= S0) & (j < S0 + SINKS)
    return (j[None, :] <= i[:, None]) & ((j[None, :] > lo[:, None]) | sink[None, :]) \
        & (i[:, None] < T)


@triton.jit
def _lin_mask(i, j, T, WINDOW, SINKS, S0):
    """Linear set: left the window, real and not a sink."""
    return (j[None, :] <= i[:, None] - WINDOW) & (j[None, :] >= S0 + SINKS) & (i[:, None] < T)


@triton.jit
def _row_start(start, b, HAS_START: tl.constexpr):
    """Left-padding tokens of row b (0 without ``start``)."""
    if HAS_START:
        return tl.load(start + b).to(tl.int32)
    else:
        return 0


@triton.jit
def _far_sinks(S0, SINKS, c0, BLOCK: tl.constexpr, BS: tl.constexpr):
    """Sink positions S0 + [0, BS) and which of them lie below the exact key range c0*BLOCK."""
    js = S0 + tl.arange(0, BS)
    return js, (tl.arange(0, BS) < SINKS) & (js < c0 * BLOCK)


@triton.jit
def _probs(s, m, mask, g):
    """g * exp2(s - m) on the mask, 0 elsewhere; masked scores never reach exp2 (no inf)."""
    return g * tl.exp2(tl.where(mask, s - m[:, None], float("-inf")))


@triton.jit
def _prefix_kernel(fk, v, start, hs, zs, T, NC, SINKS, HKV: tl.constexpr, F: tl.constexpr,
                   D: tl.constexpr, BLOCK: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
                   PREC: tl.constexpr, HAS_START: tl.constexpr):
    """hs[bh, c] = sum_{S0 + SINKS <= j < c*BLOCK} fk_j (x) v_j; zs likewise for fk (exclusive)."""
    bh = tl.program_id(0).to(tl.int64)
    b, hk = bh // HKV, bh % HKV
    S0 = _row_start(start, b, HAS_START)
    rf = tl.arange(0, BF)
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    rt = tl.arange(0, BLOCK)
    fk_base = fk + b * T * HKV * F + hk * F
    v_base = v + b * T * HKV * D + hk * D
    acc = tl.zeros([BF, BD], tl.float32)
    accz = tl.zeros([BF], tl.float32)
    smask = (rf[:, None] < F) & (rd[None, :] < D)
    for c in range(NC):
        tl.store(hs + (bh * NC + c) * F * D + rf[:, None] * D + rd[None, :], acc, mask=smask)
        tl.store(zs + (bh * NC + c) * F + rf, accz, mask=rf < F)
        j = c * BLOCK + rt
        ok = (j >= S0 + SINKS) & (j < T)
        kf = _tile(fk_base, j, HKV * F, rf, ok, F)
        vv = _tile(v_base, j, HKV * D, rd, ok, D)
        acc += _dot(tl.trans(kf), vv, PREC)
        accz += tl.sum(kf.to(tl.float32), 0)


@triton.jit
def _fwd_kernel(q, k, v, fq, fk, gate, start, hs, zs, o, m_out, z_out, am_out,
                T, NC, SCALE2, WINDOW, SINKS, KSHIFT,
                H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
                BLOCK: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BS: tl.constexpr,
                PREC: tl.constexpr, PREC32: tl.constexpr, HAS_START: tl.constexpr):
    """One (query block, batch*head): softmax over sinks + window, then the linear part.
    Pad rows (i < S0) have no keys: output 0, z stored as 1 so the backward stays finite."""
    qb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    S0 = _row_start(start, b, HAS_START)
    hk = h // (H // HKV)
    i = qb * BLOCK + tl.arange(0, BLOCK)
    iok = i < T
    rd, rf = tl.arange(0, BD), tl.arange(0, BF)
    kvo = b * T * HKV * D + hk * D
    qt = _tile(q + b * T * H * D + h * D, i, H * D, rd, iok, D)
    g = tl.load(gate + h).to(tl.float32)
    c0 = tl.maximum(qb - KSHIFT, 0)

    m = tl.full([BLOCK], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, BD], tl.float32)
    am = tl.full([BLOCK], -1, tl.int32)
    if SINKS > 0:
        if c0 * BLOCK > S0:
            js, jok = _far_sinks(S0, SINKS, c0, BLOCK, BS)
            ks = _tile(k + kvo, js, HKV * D, rd, jok, D)
            vs = _tile(v + kvo, js, HKV * D, rd, jok, D)
            mask = jok[None, :] & iok[:, None]
            m, l, acc, am = _soft_step(qt, ks, vs, js, mask, m, l, acc, am, SCALE2, PREC)
    for kb in range(c0, qb + 1):
        j = kb * BLOCK + tl.arange(0, BLOCK)
        kt = _tile(k + kvo, j, HKV * D, rd, j < T, D)
        vt = _tile(v + kvo, j, HKV * D, rd, j < T, D)
        mask = _soft_mask(i, j, T, WINDOW, SINKS, S0)
        m, l, acc, am = _soft_step(qt, kt, vt, j, mask, m, l, acc, am, SCALE2, PREC)

    acc = g * acc
    l = g * l
    fqt = _tile(fq + b * T * H * F + h * F, i, H * F, rf, iok, F)
    fko = b * T * HKV * F + hk * F
    if c0 > 0:
        st = (b * HKV + hk) * NC + c0
        ht = _tile(hs + st * F * D, rf, D, rd, rf < F, D)
        zt = tl.load(zs + st * F + rf, mask=rf < F, other=0.0)
        acc += (1 - g) * _dot(fqt.to(tl.float32), ht, PREC32)
        l += (1 - g) * tl.sum(fqt.to(tl.float32) * zt[None, :], 1)
    lin_end = tl.maximum(qb * BLOCK + BLOCK - WINDOW, 0)
    for kb in range(c0, (lin_end + BLOCK - 1) // BLOCK):
        j = kb * BLOCK + tl.arange(0, BLOCK)
        fkt = _tile(fk + fko, j, HKV * F, rf, j < T, F)
        vt = _tile(v + kvo, j, HKV * D, rd, j < T, D)
        w = _dot(fqt, tl.trans(fkt), PREC)
        w = tl.where(_lin_mask(i, j, T, WINDOW, SINKS, S0), (1 - g) * w, 0.0)
        l += tl.sum(w, 1)
        acc += _dot(w.to(vt.dtype), vt, PREC)

    l = tl.where(l == 0.0, 1.0, l)  # l == 0 only on rows past T or of left padding
    out = acc / l[:, None]
    tl.store(o + b * T * H * D + h * D + i[:, None] * (H * D) + rd[None, :],
             out.to(o.dtype.element_ty), mask=iok[:, None] & (rd[None, :] < D))
    tl.store(m_out + bh * T + i, m, mask=iok)
    tl.store(z_out + bh * T + i, l, mask=iok)
    tl.store(am_out + bh * T + i, am, mask=iok)


@triton.jit
def _dq_soft(qt, dot_, kt, vt, mask, m, inv_z, delta, g, dq, spd, SCALE2, PREC: tl.constexpr):
    """Softmax part of dq for one key block: ds = P * dP, dq += ds k, spd += sum ds."""
    p = _probs(_dot(qt, tl.trans(kt), PREC) * SCALE2, m, mask, g)
    dp = (_dot(dot_, tl.trans(vt), PREC) - delta[:, None]) * inv_z[:, None]
    ds = p * dp
    dq += _dot(ds.to(kt.dtype), kt, PREC)
    return dq, spd + tl.sum(ds, 1)


@triton.jit
def _bwd_dq_kernel(q, k, v, fq, fk, gate, start, hs, zs, o, do, m_in, z_in, am_in,
                   dq, dfq, dm_out, delta_out, dg_out,
                   T, NC, SCALE, SCALE2, WINDOW, SINKS, KSHIFT,
                   H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
                   BLOCK: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BS: tl.constexpr,
                   PREC: tl.constexpr, PREC32: tl.constexpr, HAS_START: tl.constexpr):
    """dq and dfq of one query block; also dm (grad of the max), delta = do.o and dgate per row."""
    qb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    S0 = _row_start(start, b, HAS_START)
    hk = h // (H // HKV)
    i = qb * BLOCK + tl.arange(0, BLOCK)
    iok = i < T
    rd, rf = tl.arange(0, BD), tl.arange(0, BF)
    qo, kvo = b * T * H * D + h * D, b * T * HKV * D + hk * D
    qt = _tile(q + qo, i, H * D, rd, iok, D)
    dot_ = _tile(do + qo, i, H * D, rd, iok, D)
    ot = _tile(o + qo, i, H * D, rd, iok, D)
    delta = tl.sum(dot_.to(tl.float32) * ot.to(tl.float32), 1)
    m = tl.load(m_in + bh * T + i, mask=iok, other=0.0)
    inv_z = 1.0 / tl.load(z_in + bh * T + i, mask=iok, other=1.0)
    am = tl.load(am_in + bh * T + i, mask=iok, other=-1)
    g = tl.load(gate + h).to(tl.float32)
    c0 = tl.maximum(qb - KSHIFT, 0)

    dqa = tl.zeros([BLOCK, BD], tl.float32)
    spd = tl.zeros([BLOCK], tl.float32)
    if SINKS > 0:
        if c0 * BLOCK > S0:
            js, jok = _far_sinks(S0, SINKS, c0, BLOCK, BS)
            ks = _tile(k + kvo, js, HKV * D, rd, jok, D)
            vs = _tile(v + kvo, js, HKV * D, rd, jok, D)
            mask = jok[None, :] & iok[:, None]
            dqa, spd = _dq_soft(qt, dot_, ks, vs, mask, m, inv_z, delta, g, dqa, spd, SCALE2, PREC)
    for kb in range(c0, qb + 1):
        j = kb * BLOCK + tl.arange(0, BLOCK)
        kt = _tile(k + kvo, j, HKV * D, rd, j < T, D)
        vt = _tile(v + kvo, j, HKV * D, rd, j < T, D)
        mask = _soft_mask(i, j, T, WINDOW, SINKS, S0)
        dqa, spd = _dq_soft(qt, dot_, kt, vt, mask, m, inv_z, delta, g, dqa, spd, SCALE2, PREC)
    dm = -spd
    kam = _tile(k + b * T * HKV * D + hk * D, am, HKV * D, rd, iok & (am >= 0), D)
    dqa += dm[:, None] * kam.to(tl.float32)

    fqt = _tile(fq + b * T * H * F + h * F, i, H * F, rf, iok, F)
    fko = b * T * HKV * F + hk * F
    dfa = tl.zeros([BLOCK, BF], tl.float32)
    if c0 > 0:
        st = (b * HKV + hk) * NC + c0
        ht = _tile(hs + st * F * D, rf, D, rd, rf < F, D)
        zt = tl.load(zs + st * F + rf, mask=rf < F, other=0.0)
        dfa += (_dot(dot_.to(tl.float32), tl.trans(ht), PREC32)
                - delta[:, None] * zt[None, :]) * ((1 - g) * inv_z)[:, None]
    sld = tl.sum(fqt.to(tl.float32) * dfa, 1)
    lin_end = tl.maximum(qb * BLOCK + BLOCK - WINDOW, 0)
    for kb in range(c0, (lin_end + BLOCK - 1) // BLOCK):
        j = kb * BLOCK + tl.arange(0, BLOCK)
        fkt = _tile(fk + fko, j, HKV * F, rf, j < T, F)
        vt = _tile(v + kvo, j, HKV * D, rd, j < T, D)
        lmask = _lin_mask(i, j, T, WINDOW, SINKS, S0)
        dlw = (_dot(dot_, tl.trans(vt), PREC) - delta[:, None]) * inv_z[:, None]
        dlw = tl.where(lmask, dlw, 0.0)
        kern = _dot(fqt, tl.trans(fkt), PREC)
        sld += (1 - g) * tl.sum(kern * dlw, 1)
        dfa += (1 - g) * _dot(dlw.to(fkt.dtype), fkt, PREC)

    rows = i[:, None] * (H * D) + rd[None, :]
    dmask = iok[:, None] & (rd[None, :] < D)
    tl.store(dq + qo + rows, (dqa * SCALE).to(dq.dtype.element_ty), mask=dmask)
    tl.store(dfq + b * T * H * F + h * F + i[:, None] * (H * F) + rf[None, :],
             dfa.to(dfq.dtype.element_ty), mask=iok[:, None] & (rf[None, :] < F))
    tl.store(dm_out + bh * T + i, dm, mask=iok)
    tl.store(delta_out + bh * T + i, delta, mask=iok)
    # dg = spd/g - sld/(1-g) and spd = -sld (the weights' grads sum to zero): use the linear
    # side only, so queries without linear keys give exactly 0
    tl.store(dg_out + bh * T + i, -sld / (g * (1 - g)), mask=iok)


@triton.jit
def _bwd_state_kernel(fq, do, gate, z_in, delta_in, gs, gzs, T, NC, KSHIFT,
                      H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
                      BLOCK: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
                      PREC32: tl.constexpr):
    """gs[c] = sum over query blocks qb >= c + KSHIFT + 1 (those whose prefix holds chunk c)
    of (1-g) fq^T (do / Z); gzs[c] likewise of -(1-g) fq delta / Z."""
    bh = tl.program_id(0).to(tl.int64)
    b, hk = bh // HKV, bh % HKV
    grp = H // HKV
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    rf = tl.arange(0, BF)
    acc = tl.zeros([BF, BD], tl.float32)
    accz = tl.zeros([BF], tl.float32)
    smask = (rf[:, None] < F) & (rd[None, :] < D)
    for r in range(NC):
        c = NC - 1 - r
        qb = c + KSHIFT + 1
        if qb < NC:
            i = qb * BLOCK + tl.arange(0, BLOCK)
            iok = i < T
            for hh in range(grp):
                h = hk * grp + hh
                g = tl.load(gate + h).to(tl.float32)
                wz = (1 - g) / tl.load(z_in + (b * H + h) * T + i, mask=iok, other=1.0)
                wz = tl.where(iok, wz, 0.0)
                fqt = _tile(fq + b * T * H * F + h * F, i, H * F, rf, iok, F).to(tl.float32)
                dot_ = _tile(do + b * T * H * D + h * D, i, H * D, rd, iok, D).to(tl.float32)
                dl = tl.load(delta_in + (b * H + h) * T + i, mask=iok, other=0.0)
                acc += _dot(tl.trans(fqt), dot_ * wz[:, None], PREC32)
                accz -= tl.sum(fqt * (dl * wz)[:, None], 0)
        tl.store(gs + (bh * NC + c) * F * D + rf[:, None] * D + rd[None, :], acc, mask=smask)
        tl.store(gzs + (bh * NC + c) * F + rf, accz, mask=rf < F)


@triton.jit
def _bwd_sink_kernel(q, k, v, do, gate, start, m_in, z_in, am_in, dm_in, delta_in, part,
                     T, NC, SCALE, SCALE2, SINKS, KSHIFT, QPS,
                     H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                     BLOCK: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr,
                     HAS_START: tl.constexpr):
    """Sinks' dk/dv from far query blocks (those whose exact key range starts above the sink) of
    one split; part [NS, B*HKV, 2, BS, BD], row r for the sink at S0 + r."""
    split = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, hk = bh // HKV, bh % HKV
    S0 = _row_start(start, b, HAS_START)
    grp = H // HKV
    rd = tl.arange(0, BD)
    js = S0 + tl.arange(0, BS)
    jok = (tl.arange(0, BS) < SINKS) & (js < T)
    kvo = b * T * HKV * D + hk * D
    ks = _tile(k + kvo, js, HKV * D, rd, jok, D)
    vs = _tile(v + kvo, js, HKV * D, rd, jok, D)
    dks = tl.zeros([BS, BD], tl.float32)
    dvs = tl.zeros([BS, BD], tl.float32)
    lo = tl.maximum(split * QPS, KSHIFT + 1)
    hi = tl.minimum((split + 1) * QPS, NC)
    for hh in range(grp):
        h = hk * grp + hh
        g = tl.load(gate + h).to(tl.float32)
        for qb in range(lo, hi):
            i = qb * BLOCK + tl.arange(0, BLOCK)
            iok = i < T
            qo = b * T * H * D + h * D
            qt = _tile(q + qo, i, H * D, rd, iok, D)
            dot_ = _tile(do + qo, i, H * D, rd, iok, D)
            ro = (b * H + h) * T + i
            m = tl.load(m_in + ro, mask=iok, other=0.0)
            inv_z = 1.0 / tl.load(z_in + ro, mask=iok, other=1.0)
            am = tl.load(am_in + ro, mask=iok, other=-1)
            dm = tl.load(dm_in + ro, mask=iok, other=0.0)
            delta = tl.load(delta_in + ro, mask=iok, other=0.0)
            _, far = _far_sinks(S0, SINKS, qb - KSHIFT, BLOCK, BS)
            mask = far[None, :] & iok[:, None]
            p = _probs(_dot(qt, tl.trans(ks), PREC) * SCALE2, m, mask, g)
            dp = (_dot(dot_, tl.trans(vs), PREC) - delta[:, None]) * inv_z[:, None]
            ds = p * dp + tl.where(mask & (am[:, None] == js[None, :]), dm[:, None], 0.0)
            dks += _dot(tl.trans(ds.to(qt.dtype)), qt, PREC)
            dz = (dot_.to(tl.float32) * inv_z[:, None]).to(vs.dtype)
            dvs += _dot(tl.trans(p.to(vs.dtype)), dz, PREC)
    rs = tl.arange(0, BS)
    base = part + (split * (tl.num_programs(1)) + bh) * 2 * BS * BD + rs[:, None] * BD + rd[None, :]
    tl.store(base, dks * SCALE)
    tl.store(base + BS * BD, dvs)


@triton.jit
def _bwd_dkv_kernel(q, k, v, fq, fk, do, gate, start, m_in, z_in, am_in, dm_in, delta_in, gs,
                    gzs, sink_g, dk, dv, dfk, T, NC, SCALE, SCALE2, WINDOW, SINKS, KSHIFT,
                    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
                    BLOCK: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BS: tl.constexpr,
                    PREC: tl.constexpr, PREC32: tl.constexpr, HAS_START: tl.constexpr):
    """dk, dv, dfk of one key block: exact part from query blocks kb..kb+KSHIFT (all group heads),
    the prefix-state part from gs/gzs, and (blocks holding sinks) the sinks' far-query part."""
    kb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, hk = bh // HKV, bh % HKV
    S0 = _row_start(start, b, HAS_START)
    grp = H // HKV
    j = kb * BLOCK + tl.arange(0, BLOCK)
    jok = j < T
    rd, rf = tl.arange(0, BD), tl.arange(0, BF)
    kvo, fko = b * T * HKV * D + hk * D, b * T * HKV * F + hk * F
    kt = _tile(k + kvo, j, HKV * D, rd, jok, D)
    vt = _tile(v + kvo, j, HKV * D, rd, jok, D)
    fkt = _tile(fk + fko, j, HKV * F, rf, jok, F)
    dka = tl.zeros([BLOCK, BD], tl.float32)
    dva = tl.zeros([BLOCK, BD], tl.float32)
    dfa = tl.zeros([BLOCK, BF], tl.float32)
    for hh in range(grp):
        h = hk * grp + hh
        g = tl.load(gate + h).to(tl.float32)
        for qb in range(kb, tl.minimum(kb + KSHIFT, NC - 1) + 1):
            i = qb * BLOCK + tl.arange(0, BLOCK)
            iok = i < T
            qo = b * T * H * D + h * D
            qt = _tile(q + qo, i, H * D, rd, iok, D)
            dot_ = _tile(do + qo, i, H * D, rd, iok, D)
            fqt = _tile(fq + b * T * H * F + h * F, i, H * F, rf, iok, F)
            ro = (b * H + h) * T + i
            m = tl.load(m_in + ro, mask=iok, other=0.0)
            inv_z = 1.0 / tl.load(z_in + ro, mask=iok, other=1.0)
            am = tl.load(am_in + ro, mask=iok, other=-1)
            dm = tl.load(dm_in + ro, mask=iok, other=0.0)
            delta = tl.load(delta_in + ro, mask=iok, other=0.0)
            s = _dot(qt, tl.trans(kt), PREC) * SCALE2
            p = _probs(s, m, _soft_mask(i, j, T, WINDOW, SINKS, S0), g)
            dp = (_dot(dot_, tl.trans(vt), PREC) - delta[:, None]) * inv_z[:, None]
            ds = p * dp + tl.where(am[:, None] == j[None, :], dm[:, None], 0.0)
            dka += _dot(tl.trans(ds.to(qt.dtype)), qt, PREC)
            lmask = _lin_mask(i, j, T, WINDOW, SINKS, S0)
            lw = tl.where(lmask, (1 - g) * _dot(fqt, tl.trans(fkt), PREC), 0.0)
            dz = (dot_.to(tl.float32) * inv_z[:, None]).to(vt.dtype)
            dva += _dot(tl.trans((p + lw).to(vt.dtype)), dz, PREC)
            dlw = tl.where(lmask, (1 - g) * dp, 0.0)
            dfa += _dot(tl.trans(dlw.to(fqt.dtype)), fqt, PREC)
    # keys of this block as part of later prefix states
    st = bh * NC + kb
    gt = _tile(gs + st * F * D, rf, D, rd, rf < F, D)
    gzt = tl.load(gzs + st * F + rf, mask=rf < F, other=0.0)
    lin_ok = (j >= S0 + SINKS)[:, None]
    dfa += tl.where(lin_ok, _dot(vt.to(tl.float32), tl.trans(gt), PREC32)
                    + gzt[None, :], 0.0)
    dva += tl.where(lin_ok, _dot(fkt.to(tl.float32), gt, PREC32), 0.0)
    dka = dka * SCALE
    if SINKS > 0:
        if (kb * BLOCK < S0 + SINKS) & (kb * BLOCK + BLOCK > S0):
            sok = ((j >= S0) & (j < S0 + SINKS))[:, None] & (rd[None, :] < BD)
            sb = sink_g + bh * 2 * BS * BD + (j - S0)[:, None] * BD + rd[None, :]
            dka += tl.load(sb, mask=sok, other=0.0)
            dva += tl.load(sb + BS * BD, mask=sok, other=0.0)
    dmask = jok[:, None] & (rd[None, :] < D)
    rows = j[:, None] * (HKV * D) + rd[None, :]
    tl.store(dk + kvo + rows, dka.to(dk.dtype.element_ty), mask=dmask)
    tl.store(dv + kvo + rows, dva.to(dv.dtype.element_ty), mask=dmask)
    tl.store(dfk + fko + j[:, None] * (HKV * F) + rf[None, :], dfa.to(dfk.dtype.element_ty),
             mask=jok[:, None] & (rf[None, :] < F))


def _p2(n: int) -> int:
    """Block size for a dimension: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(n))


def _meta(q, k, fq, sinks: int, chunk: int, start) -> dict:
    """Compile-time parameters shared by the kernels."""
    d, f = q.shape[-1], fq.shape[-1]
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    return dict(H=q.shape[2], HKV=k.shape[2], D=d, F=f, BLOCK=chunk, BD=_p2(d), BF=_p2(f),
                BS=_p2(max(sinks, 1)), PREC=prec, num_warps=4 if _p2(d) <= 64 else 8,
                HAS_START=start is not None)


def _prefix(fk, v, start, sinks: int, chunk: int, prec: str):
    """Exclusive per-chunk prefix states hs [B*Hkv, NC, F, D] and zs [B*Hkv, NC, F] (fp32)."""
    b, t, hkv, f = fk.shape
    d = v.shape[-1]
    nc = triton.cdiv(t, chunk)
    hs = _empty(b * hkv, nc, f, d, like=v, dtype=torch.float32)
    zs = _empty(b * hkv, nc, f, like=v, dtype=torch.float32)
    bd = min(_p2(d), 64)
    _prefix_kernel[(b * hkv, triton.cdiv(d, bd))](
        fk, v, start, hs, zs, t, nc, sinks, HKV=hkv, F=f, D=d, BLOCK=chunk, BF=_p2(f), BD=bd,
        PREC=prec, HAS_START=start is not None)
    return hs, zs


def _kshift(window: int, chunk: int) -> int:
    """Query block qb reads the prefix state of chunk max(0, qb - K)."""
    return -(-(window - 1) // chunk)


def _forward(q, k, v, fq, fk, gate, start, window, sinks, scale, chunk):
    b, t, h, d = q.shape
    meta = _meta(q, k, fq, sinks, chunk, start)
    hs, zs = _prefix(fk, v, start, sinks, chunk, meta["PREC"])
    nc = hs.shape[1]
    o = _empty(*q.shape, like=q)
    m, z = (_empty(b * h, t, like=q, dtype=torch.float32) for _ in range(2))
    am = _empty(b * h, t, like=q, dtype=torch.int32)
    _fwd_kernel[(nc, b * h)](q, k, v, fq, fk, gate, start, hs, zs, o, m, z, am, t, nc,
                             scale * LOG2E, window, sinks, _kshift(window, chunk),
                             PREC32=meta["PREC"], **meta)
    return o, m, z, am, hs, zs


def _backward(ctx, do):
    q, k, v, fq, fk, gate, o, m, z, am = ctx.saved_tensors
    window, sinks, scale, chunk, start = ctx.cfg
    b, t, h, d = q.shape
    hkv = k.shape[2]
    meta = _meta(q, k, fq, sinks, chunk, start)
    hs, zs = _prefix(fk, v, start, sinks, chunk, meta["PREC"])
    meta["num_warps"] = max(meta["num_warps"], BWD_WARPS)
    nc, ks = hs.shape[1], _kshift(window, chunk)
    common = (t, nc, scale, scale * LOG2E)
    dq, dfq = _empty(*q.shape, like=q), _empty(*fq.shape, like=fq)
    dm, delta, dg = (_empty(b * h, t, like=q, dtype=torch.float32) for _ in range(3))
    _bwd_dq_kernel[(nc, b * h)](q, k, v, fq, fk, gate, start, hs, zs, o, do, m, z, am, dq, dfq,
                                dm, delta, dg, *common, window, sinks, ks, PREC32=meta["PREC"],
                                **meta)
    gs, gzs = _empty(*hs.shape, like=hs), _empty(*zs.shape, like=zs)
    bd = min(meta["BD"], 64)
    _bwd_state_kernel[(b * hkv, triton.cdiv(d, bd))](
        fq, do, gate, z, delta, gs, gzs, t, nc, ks, H=h, HKV=hkv, D=d, F=meta["F"],
        BLOCK=chunk, BD=bd, BF=meta["BF"], PREC32=meta["PREC"])
    sink_g = _sink_grads(q, k, v, do, gate, start, m, z, am, dm, delta, common, sinks, ks, meta)
    dk, dv, dfk = (_empty(*x.shape, like=x) for x in (k, v, fk))
    _bwd_dkv_kernel[(nc, b * hkv)](q, k, v, fq, fk, do, gate, start, m, z, am, dm, delta, gs,
                                   gzs, sink_g, dk, dv, dfk, *common, window, sinks, ks,
                                   PREC32=meta["PREC"], **meta)
    dgate = dg.view(b, h, t).sum((0, 2)).to(gate.dtype)
    return dq, dk, dv, dfq, dfk, dgate


def _sink_grads(q, k, v, do, gate, start, m, z, am, dm, delta, common, sinks, ks, meta):
    """dk/dv of the sink keys from query blocks beyond KSHIFT, [B*Hkv, 2, BS, BD] (fp32)."""
    b, t = q.shape[:2]
    nc, nbh, bs, bd = common[1], b * meta["HKV"], meta["BS"], meta["BD"]
    if sinks == 0 or nc <= ks + 1:
        return torch.zeros(nbh, 2, bs, bd, device=q.device, dtype=torch.float32)
    n_split = max(1, min(nc, 4 * 132 // nbh))
    qps = triton.cdiv(nc, n_split)
    n_split = triton.cdiv(nc, qps)
    part = _empty(n_split, nbh, 2, bs, bd, like=q, dtype=torch.float32)
    skip = ("F", "BF")
    _bwd_sink_kernel[(n_split, nbh)](q, k, v, do, gate, start, m, z, am, dm, delta, part, *common,
                                     sinks, ks, qps, **{x: y for x, y in meta.items()
                                                        if x not in skip})
    return part.sum(0)


class LSWAChunkFunction(torch.autograd.Function):
    """Autograd wrapper; forward also returns the prefix states (non-differentiable)."""

    @staticmethod
    def forward(ctx, q, k, v, fq, fk, gate, start, window, sinks, scale, chunk):
        o, m, z, am, hs, zs = _forward(q, k, v, fq, fk, gate, start, window, sinks, scale, chunk)
        ctx.save_for_backward(q, k, v, fq, fk, gate, o, m, z, am)
        ctx.cfg = (window, sinks, scale, chunk, start)
        ctx.mark_non_differentiable(hs, zs)
        return o, hs, zs

    @staticmethod
    def backward(ctx, do, _dhs, _dzs):
        return (*_backward(ctx, do.contiguous()), None, None, None, None, None)


def _final_state(k, v, fk, hs, zs, start, window: int, sinks: int, chunk: int) -> LSWAState:
    """Decode state after the prefill, the linear part read from the prefix states."""
    b, t, hkv, d = k.shape
    f = fk.shape[-1]
    k, v, fk = k.detach(), v.detach(), fk.detach()
    st = window_state(k, v, fk, window, sinks, start)
    end = t - window  # tokens below end left the window
    if end > sinks:
        c = end // chunk
        st.lin_s.copy_(hs.view(b, hkv, -1, f, d)[:, :, c])
        st.lin_z.copy_(zs.view(b, hkv, -1, f)[:, :, c])
        fold_linear(st, fk, v, max(sinks, c * chunk), end, start)
    return st


def lswa_chunk(q, k, v, fq, fk, gate, window: int, sinks: int, scale: float | None = None,
               return_state: bool = False, chunk_size: int = 64,
               start: torch.Tensor | None = None):
    """LSWA with the chunked Triton kernels; differentiable in q, k, v, fq, fk and gate.

    All inputs are cast to q's dtype (fp32 accumulation inside). With ``return_state`` it also
    returns the decode ``LSWAState`` after the sequence (not differentiable). ``start`` [B]
    (0 <= start <= T): left-padding tokens per row, as in ``lswa_naive``; pad rows output 0.
    """
    b, t, h, d = q.shape
    if not (1 <= sinks + 1 <= chunk_size + 1 and window >= 1 and h % k.shape[2] == 0):
        raise ValueError(f"need 0 <= sinks <= chunk_size, window >= 1 and H % Hkv == 0; got "
                         f"sinks={sinks}, window={window}, H={h}, Hkv={k.shape[2]}")
    scale = d ** -0.5 if scale is None else float(scale)
    q, k, v, fq, fk = (x.to(q.dtype).contiguous() for x in (q, k, v, fq, fk))
    if start is not None:
        start = start.to(q.device, torch.int64).contiguous()
    o, hs, zs = LSWAChunkFunction.apply(q, k, v, fq, fk, gate.contiguous(), start, window, sinks,
                                        scale, chunk_size)
    if not return_state:
        return o
    return o, _final_state(k, v, fk, hs, zs, start, window, sinks, chunk_size)
