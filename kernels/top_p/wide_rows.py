"""Triton wide-row top-p kernel: one program per row (see the package docstring)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .naive import KEY_FLOOR, MASS_SCALE

ONE_BITS = 1065353216  # the float32 bit pattern of 1.0: no probability lies above it


@triton.jit
def _kernel(probs_ptr, log_u_ptr, fits_ptr, tokens_ptr, V, bound, SCALE: tl.constexpr,
            FLOOR: tl.constexpr, BLOCK: tl.constexpr, ONE: tl.constexpr):
    """A row whose nucleus is wider than the candidates (``fits`` 0) gets its token here: the smallest
    float bit pattern ``b`` whose integer mass above it is below ``bound`` is the nucleus's last
    probability (bisection over [0, bits(1.0)]: 30 halvings), then the race."""
    row = tl.program_id(0)
    if tl.load(fits_ptr + row) == 0:
        base = row.to(tl.int64) * V
        offs = tl.arange(0, BLOCK)
        lo = tl.zeros((), tl.int32)
        hi = tl.full((), ONE, tl.int32)
        for _ in range(30):
            mid = (lo + hi) // 2
            above = tl.zeros((), tl.int64)
            for start in range(0, V, BLOCK):
                idx = start + offs
                p = tl.load(probs_ptr + base + idx, mask=idx < V, other=0.0)
                mass = (p * SCALE).to(tl.int64)
                above += tl.sum(tl.where(p.to(tl.int32, bitcast=True) > mid, mass, 0), axis=0)
            inside = above < bound
            hi = tl.where(inside, mid, hi)
            lo = tl.where(inside, lo, mid + 1)
        best = tl.full((), float("-inf"), tl.float32)
        best_i = tl.zeros((), tl.int32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            p = tl.load(probs_ptr + base + idx, mask=idx < V, other=0.0)
            log_u = tl.load(log_u_ptr + base + idx, mask=idx < V, other=-1.0)
            kept = (p.to(tl.int32, bitcast=True) >= hi) & (idx < V)
            key = tl.where(kept, tl.maximum(tl.math.div_rn(log_u, p), FLOOR), float("-inf"))
            block_best = tl.max(key, axis=0)
            block_i = tl.argmax(key, axis=0)
            better = block_best > best
            best_i = tl.where(better, start + block_i, best_i)
            best = tl.where(better, block_best, best)
        tl.store(tokens_ptr + row, best_i.to(tl.int64))


def top_p_wide_rows_triton(probs, log_u, fits, tokens, bound: int, block: int = 4096) -> None:
    """Overwrite ``tokens`` [N] (int64, contiguous) of the rows with ``fits`` False; probs/log_u [N, V] float32."""
    probs, log_u = probs.contiguous(), log_u.contiguous()
    _kernel[(probs.shape[0],)](probs, log_u, fits.view(torch.int8), tokens, probs.shape[-1], bound,
                               SCALE=MASS_SCALE, FLOOR=KEY_FLOOR, BLOCK=block, ONE=ONE_BITS)
