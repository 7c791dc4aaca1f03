"""Triton kernels of the fused decode glue: one launch each, same math and roundings as ``naive``.

* ``rmsnorm`` / ``add_rmsnorm``: one program per row; the residual sum is rounded to the input
  dtype before its statistics, as ``x + delta`` then the norm would.
* ``rope_qkv`` (+ cache write): one program per (row, head) of q and k; k programs also move v.
  The per-head q/k RMSNorm (Qwen3) runs first; the rotated half is loaded as a second view of the
  same row. Each product is rounded before the sum, as ``q * cos + rotate_half(q) * sin``.
* ``silu_mul``: one program per (row, block of the intermediate size).
* ``feature_map``: one program per (row, kv head): the group's query heads and its key together.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(x, delta, total, out, w, eps, C, HAS_DELTA: tl.constexpr, BC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, BC)
    ok = rc < C
    xv = tl.load(x + row * C + rc, mask=ok, other=0.0)
    if HAS_DELTA:
        dv = tl.load(delta + row * C + rc, mask=ok, other=0.0)
        xv = (xv.to(tl.float32) + dv.to(tl.float32)).to(x.dtype.element_ty)
        tl.store(total + row * C + rc, xv, mask=ok)
    xf = xv.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / C + eps)
    y = (xf * inv).to(x.dtype.element_ty).to(tl.float32) * tl.load(w + rc, mask=ok, other=0.0).to(tl.float32)
    tl.store(out + row * C + rc, y.to(out.dtype.element_ty), mask=ok)


def _norm_out(x, weight):
    return torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)


def rmsnorm_fused(x, weight, eps: float):
    """HF RMSNorm of rows x [B, C]."""
    x = x.contiguous()
    out = _norm_out(x, weight)
    c = x.shape[-1]
    _rmsnorm_kernel[(x.numel() // c,)](x, x, x, out, weight, float(eps), c, HAS_DELTA=False,
                                       BC=triton.next_power_of_2(c), num_warps=4)
    return out


def add_rmsnorm_fused(x, delta, weight, eps: float):
    """(x + delta, its RMSNorm) for rows [B, C]."""
    x, delta = x.contiguous(), delta.contiguous()
    total, out = torch.empty_like(x), _norm_out(x, weight)
    c = x.shape[-1]
    _rmsnorm_kernel[(x.numel() // c,)](x, delta, total, out, weight, float(eps), c, HAS_DELTA=True,
                                       BC=triton.next_power_of_2(c), num_warps=4)
    return total, out


@triton.jit
def _rope_kernel(qkv, cos, sin, pos, q_out, k_out, v_out, qn, kn, eps,
                 sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                 H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HAS_NORM: tl.constexpr,
                 TO_CACHE: tl.constexpr, BD: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)  # head: q heads first, then kv heads
    half: tl.constexpr = D // 2
    rd = tl.arange(0, BD)
    ok = rd < D
    partner = tl.where(rd < half, rd + half, rd - half)
    sign = tl.where(rd < half, -1.0, 1.0)
    width: tl.constexpr = (H + 2 * HKV) * D
    base = qkv + b * width + j * D
    x = tl.load(base + rd, mask=ok, other=0.0)
    xp = tl.load(base + partner, mask=ok, other=0.0)
    dt = x.dtype
    if HAS_NORM:
        wn = tl.where(j < H, qn, kn)
        xf = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / D + eps)
        x = ((xf * inv).to(dt).to(tl.float32) * tl.load(wn + rd, mask=ok, other=0.0).to(tl.float32)).to(dt)
        xp = ((xp.to(tl.float32) * inv).to(dt).to(tl.float32)
              * tl.load(wn + partner, mask=ok, other=0.0).to(tl.float32)).to(dt)
    p = tl.load(pos + b)
    c = tl.load(cos + p * D + rd, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(sin + p * D + rd, mask=ok, other=0.0).to(tl.float32)
    a = (x.to(tl.float32) * c).to(dt).to(tl.float32)
    r = (sign * xp.to(tl.float32) * s).to(dt).to(tl.float32)
    y = (a + r).to(dt)
    if j < H:
        tl.store(q_out + (b * H + j) * D + rd, y, mask=ok)
    else:
        hk = j - H
        v = tl.load(qkv + b * width + (H + HKV + hk) * D + rd, mask=ok, other=0.0)
        if TO_CACHE:
            tl.store(k_out + b * sk_b + hk * sk_h + p * sk_l + rd, y.to(k_out.dtype.element_ty), mask=ok)
            tl.store(v_out + b * sv_b + hk * sv_h + p * sv_l + rd, v.to(v_out.dtype.element_ty), mask=ok)
        else:
            tl.store(k_out + (b * HKV + hk) * D + rd, y, mask=ok)
            tl.store(v_out + (b * HKV + hk) * D + rd, v, mask=ok)


def _rope_launch(qkv, cos, sin, pos, heads, kv_heads, k_out, v_out, q_norm, k_norm, eps, to_cache):
    qkv = qkv.contiguous()
    b = qkv.shape[0]
    d = qkv.shape[-1] // (heads + 2 * kv_heads)
    if d % 2 or cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.shape[-1] != d:
        raise ValueError(f"rope: head dim {d} must be even and match contiguous cos/sin tables {tuple(cos.shape)}")
    q = torch.empty(b, heads, d, dtype=qkv.dtype, device=qkv.device)
    norm = q_norm is not None
    sk = k_out.stride()[-4:-1] if to_cache else (0, 0, 0)
    sv = v_out.stride()[-4:-1] if to_cache else (0, 0, 0)
    _rope_kernel[(b, heads + kv_heads)](
        qkv, cos, sin, pos, q, k_out, v_out, q_norm if norm else qkv, k_norm if norm else qkv, float(eps),
        *sk, *sv, H=heads, HKV=kv_heads, D=d, HAS_NORM=norm, TO_CACHE=to_cache,
        BD=max(16, triton.next_power_of_2(d)), num_warps=1)
    return q


def rope_qkv_fused(qkv, cos, sin, pos, heads: int, kv_heads: int, q_norm=None, k_norm=None, eps: float = 0.0):
    """Roped q [B, H, D], k and v [B, Hkv, D] in one launch (see ``naive.rope_qkv_naive``)."""
    b = qkv.shape[0]
    d = qkv.shape[-1] // (heads + 2 * kv_heads)
    k = torch.empty(b, kv_heads, d, dtype=qkv.dtype, device=qkv.device)
    v = torch.empty_like(k)
    q = _rope_launch(qkv, cos, sin, pos, heads, kv_heads, k, v, q_norm, k_norm, eps, False)
    return q, k, v


def rope_qkv_cache_fused(qkv, cos, sin, pos, heads: int, kv_heads: int, k_cache, v_cache, q_norm=None, k_norm=None,
                         eps: float = 0.0):
    """Roped q [B, H, D]; roped k and v written to row pos[b] of k/v caches [B, Hkv, L, D] (unit stride on D)."""
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("rope_qkv_cache: caches need unit stride on the head dimension")
    return _rope_launch(qkv, cos, sin, pos, heads, kv_heads, k_cache, v_cache, q_norm, k_norm, eps, True)


@triton.jit
def _silu_mul_kernel(gu, out, I, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    ri = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = ri < I
    g = tl.load(gu + b * 2 * I + ri, mask=ok, other=0.0)
    u = tl.load(gu + b * 2 * I + I + ri, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(out + b * I + ri, (act * u.to(tl.float32)).to(out.dtype.element_ty), mask=ok)


def silu_mul_fused(gu):
    """silu(gate) * up from gu [B, 2I] (gate first)."""
    gu = gu.contiguous()
    b, i = gu.shape[0], gu.shape[-1] // 2
    out = torch.empty(b, i, dtype=gu.dtype, device=gu.device)
    block = min(1024, triton.next_power_of_2(i))
    _silu_mul_kernel[(b, triton.cdiv(i, block))](gu, out, i, BLOCK=block, num_warps=4)
    return out


@triton.jit
def _phi(z, fok):
    """[softmax(z), softmax(-z)] halves of a feature row block (masked columns excluded)."""
    zp = tl.where(fok, z, float("-inf"))
    ep = tl.exp(zp - tl.max(zp, 1)[:, None])
    zn = tl.where(fok, -z, float("-inf"))
    en = tl.exp(zn - tl.max(zn, 1)[:, None])
    return ep / tl.sum(ep, 1)[:, None], en / tl.sum(en, 1)[:, None]


@triton.jit
def _feature_map_kernel(q, k, w, fq, fk, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, F2: tl.constexpr,
                        BG: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64)
    grp: tl.constexpr = H // HKV
    rg, rd, rf = tl.arange(0, BG), tl.arange(0, BD), tl.arange(0, BF)
    dok, fok = rd < D, rf < F2
    # rows 0..grp-1: the group's query heads; row grp: the key
    is_q = rg < grp
    q_off = (b * H + hk * grp + rg)[:, None] * D + rd[None, :]
    x = tl.load(q + q_off, mask=is_q[:, None] & dok[None, :], other=0.0).to(tl.float32)
    kx = tl.load(k + (b * HKV + hk) * D + rd, mask=dok, other=0.0).to(tl.float32)
    x = tl.where((rg == grp)[:, None], kx[None, :], x)
    wt = tl.load(w + hk * D * F2 + rd[:, None] * F2 + rf[None, :], mask=dok[:, None] & fok[None, :],
                 other=0.0).to(tl.float32)
    z = tl.dot(x, wt, input_precision="ieee")
    pos_half, neg_half = _phi(z, fok[None, :])
    fq_row = (b * H + hk * grp + rg)[:, None] * (2 * F2)
    qmask = is_q[:, None] & fok[None, :]
    tl.store(fq + fq_row + rf[None, :], pos_half, mask=qmask)
    tl.store(fq + fq_row + F2 + rf[None, :], neg_half, mask=qmask)
    k_row = (b * HKV + hk) * (2 * F2) + rg[:, None] * 0
    kmask = (rg == grp)[:, None] & fok[None, :]
    tl.store(fk + k_row + rf[None, :], pos_half, mask=kmask)
    tl.store(fk + k_row + F2 + rf[None, :], neg_half, mask=kmask)


def feature_map_fused(q, k, weight):
    """(fq [B, H, F], fk [B, Hkv, F]) in float32 from q [B, H, D], k [B, Hkv, D], weight [Hkv, D, F/2]."""
    q, k, weight = q.contiguous(), k.contiguous(), weight.contiguous()
    b, h, d = q.shape
    hkv, f2 = weight.shape[0], weight.shape[-1]
    dt = torch.promote_types(q.dtype, torch.float32)
    fq = torch.empty(b, h, 2 * f2, dtype=dt, device=q.device)
    fk = torch.empty(b, hkv, 2 * f2, dtype=dt, device=q.device)
    _feature_map_kernel[(b, hkv)](q, k, weight, fq, fk, H=h, HKV=hkv, D=d, F2=f2,
                                  BG=max(16, triton.next_power_of_2(h // hkv + 1)),
                                  BD=max(16, triton.next_power_of_2(d)), BF=max(16, triton.next_power_of_2(f2)),
                                  num_warps=4)
    return fq, fk
