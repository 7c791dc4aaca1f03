"""Triton helpers shared by the kernels."""
from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton's interpreter multiplies bf16 tensors as raw integers in tl.dot: upcast there.
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def dot(a, b, PREC: tl.constexpr):
    """tl.dot with fp32 accumulation (operands upcast under the interpreter)."""
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)
