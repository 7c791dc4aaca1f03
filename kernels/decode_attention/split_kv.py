"""Triton decode attention, split over the KV length ("flash decoding").

Stage 1, one program per (sequence, kv head, split): reads its part of the filled cache once
for all query heads of the GQA group (they are the rows of one tl.dot) and writes a normalised
partial output with its log-sum-exp. Splits that start past the sequence's length return at
once, so only the filled part of the cache is read. Stage 2, one program per (sequence, head),
merges the valid splits. With one split, stage 1 writes the output itself. The number of splits
depends on the allocated length and the batch only, so a CUDA graph can capture the call.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_utils import dot as _dot

LOG2E = 1.4426950408889634
MIN_SPLIT_ROWS = 256  # a split reads at least this many cache rows (amortises its fixed cost)
_SM_COUNT: dict[int, int] = {}
# Launch parameters used when a call does not give them; :func:`tune` replaces them with the
# fastest on the current GPU for a given shape.
LAUNCH = {"block_n": 64, "num_warps": 4, "num_stages": 3, "splits": None}


@triton.jit
def _partial_kernel(q, k, v, lens, o, part_o, part_lse, SCALE2,
                    skb, skh, skl, svb, svh, svl, CHUNK,
                    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, NS: tl.constexpr,
                    BG: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    n_len = tl.load(lens + b).to(tl.int32)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, n_len)  # splits past the length run no iteration, store nothing
    grp: tl.constexpr = H // HKV
    rg, rd = tl.arange(0, BG), tl.arange(0, BD)
    gok, dok = rg < grp, rd < D
    heads = hk * grp + rg
    qt = tl.load(q + (b * H + heads)[:, None] * D + rd[None, :], mask=gok[:, None] & dok[None, :],
                 other=0.0).to(k.dtype.element_ty)
    k_base = k + b * skb + hk * skh
    v_base = v + b * svb + hk * svh
    m = tl.full([BG], float("-inf"), tl.float32)
    l = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, BD], tl.float32)
    for n0 in range(start, end, BN):
        rn = n0 + tl.arange(0, BN)
        nok = rn < end
        kt = tl.load(k_base + rn[:, None] * skl + rd[None, :], mask=nok[:, None] & dok[None, :], other=0.0)
        vt = tl.load(v_base + rn[:, None] * svl + rd[None, :], mask=nok[:, None] & dok[None, :], other=0.0)
        s = _dot(qt, tl.trans(kt), PREC) * SCALE2
        s = tl.where(nok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, PREC)
        l = l * alpha + tl.sum(p, 1)
        m = m_new
    out = acc / l[:, None]
    gok = gok & ((rg * 0 + start) < n_len)  # tensor masks: the interpreter rejects scalar ones
    omask = gok[:, None] & dok[None, :]
    if NS == 1:
        tl.store(o + (b * H + heads)[:, None] * D + rd[None, :], out.to(o.dtype.element_ty), mask=omask)
    else:
        row = (b * H + heads) * NS + split
        tl.store(part_o + row[:, None] * D + rd[None, :], out, mask=omask)
        tl.store(part_lse + row, m + tl.log2(l), mask=gok)


@triton.jit
def _merge_kernel(lens, part_o, part_lse, o, CHUNK,
                  H: tl.constexpr, D: tl.constexpr, NS: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    n_len = tl.load(lens + b).to(tl.int32)
    rs, rd = tl.arange(0, BS), tl.arange(0, BD)
    sok = (rs < NS) & (rs * CHUNK < n_len)
    row = (b * H + h) * NS + rs
    lse = tl.load(part_lse + row, mask=sok, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    w = tl.where(sok, w, 0.0)
    parts = tl.load(part_o + row[:, None] * D + rd[None, :], mask=sok[:, None] & (rd < D)[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    tl.store(o + (b * H + h) * D + rd, out.to(o.dtype.element_ty), mask=rd < D)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def num_splits(batch: int, kv_heads: int, length: int, device: torch.device) -> int:
    """Enough programs to fill the GPU (4 per SM), none shorter than MIN_SPLIT_ROWS rows."""
    want = triton.cdiv(4 * _sm_count(device), batch * kv_heads)
    return max(1, min(want, triton.cdiv(length, MIN_SPLIT_ROWS)))


def _empty(shape, dtype, device) -> torch.Tensor:
    """Uninitialised output; tests replace this with a NaN-filled one to catch unwritten output."""
    return torch.empty(shape, dtype=dtype, device=device)


def decode_attention_split_kv(q, k_cache, v_cache, seq_lens, scale: float | None = None,
                              splits: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                              num_stages: int | None = None):
    """o [B, H, D]; k/v cache [B, Hkv, L, D] with unit stride on D; seq_lens [B] >= 1."""
    splits = splits or LAUNCH["splits"]
    block_n, num_warps, num_stages = (x or LAUNCH[n] for x, n in ((block_n, "block_n"), (num_warps, "num_warps"),
                                                                   (num_stages, "num_stages")))
    b, h, d = q.shape
    hkv, length = k_cache.shape[1], k_cache.shape[2]
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need unit stride on the head dimension")
    scale = d ** -0.5 if scale is None else float(scale)
    ns = splits or num_splits(b, hkv, length, q.device)
    chunk = triton.cdiv(triton.cdiv(length, ns), block_n) * block_n
    q = q.contiguous()
    o = _empty((b, h, d), q.dtype, q.device)
    part_o = _empty((b, h, ns, d), torch.float32, q.device) if ns > 1 else o
    part_lse = _empty((b, h, ns), torch.float32, q.device) if ns > 1 else o
    prec = "ieee" if k_cache.dtype == torch.float32 else "tf32"
    bd = max(16, triton.next_power_of_2(d))
    _partial_kernel[(b, hkv, ns)](
        q, k_cache, v_cache, seq_lens, o, part_o, part_lse, scale * LOG2E,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), chunk,
        H=h, HKV=hkv, D=d, NS=ns, BG=max(16, triton.next_power_of_2(h // hkv)), BD=bd, BN=block_n,
        PREC=prec, num_warps=num_warps, num_stages=num_stages)
    if ns > 1:
        _merge_kernel[(b, h)](seq_lens, part_o, part_lse, o, chunk, H=h, D=d, NS=ns,
                              BS=max(2, triton.next_power_of_2(ns)), BD=bd, num_warps=1)
    return o


def tune(batch: int, heads: int, kv_heads: int, head_dim: int, length: int, dtype=torch.bfloat16) -> list[dict]:
    """Time launch configurations on a full cache of this shape (CUDA), keep the fastest in LAUNCH.

    Returns every configuration with its time and the cache bandwidth it reached (bytes read / s).
    """
    q = torch.randn(batch, heads, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(batch, kv_heads, length, head_dim, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    lens = torch.full((batch,), length, device="cuda", dtype=torch.long)
    results = []
    grid = [dict(block_n=bn, num_warps=nw, num_stages=ns, splits=None)
            for bn in (32, 64, 128) for nw in (4, 8) for ns in (2, 4)]
    for cfg in grid + [None]:
        cfg = cfg or {**{n: grid[0][n] for n in ("block_n", "num_warps", "num_stages")}, "splits": 2}
        fn = lambda: decode_attention_split_kv(q, k, v, lens, **cfg)  # noqa: E731
        try:
            fn()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(10):
                    fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000 / 10
        except Exception:  # noqa: BLE001 - a configuration that does not compile is skipped
            continue
        results.append({**cfg, "us": seconds * 1e6, "tb_s": 2 * k.numel() * k.element_size() / seconds / 1e12})
        if cfg is grid[-1]:  # try splitting with the best single-split configuration
            grid[0] = min(results, key=lambda r: r["us"])
    best = min(results, key=lambda r: r["us"])
    LAUNCH.update({n: best[n] for n in ("block_n", "num_warps", "num_stages", "splits")})
    return results
