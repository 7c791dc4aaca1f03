"""Chunked Triton LSWA (forward, every gradient, prefill state) against the float64 naive reference,
also under extreme masked scores and with left padding (test_lswa_naive checks the reference).

Compiled on a GPU (marked ``gpu``), under the Triton interpreter on CPU: see triton_mode.py.
"""
import pytest
import torch
from triton_mode import DEVICE, pytestmark  # noqa: F401 - first: it sets the Triton mode

pytest.importorskip("triton")

from lbsearch.kernels.lswa import chunk  # noqa: E402
from lbsearch.kernels.lswa.naive import lswa_naive, lswa_state_from_prefill  # noqa: E402
from test_lswa_naive import (EXTREME_PAIRS, EXTREME_SHAPE, PAD_CASES, extreme_inputs,  # noqa: E402
                             extreme_reference, left_pad, pad_id)


# (B, T, H, Hkv, D, F, window, sinks, chunk)
SHAPES = [
    (2, 37, 4, 2, 16, 8, 5, 2, 16),     # GQA, T not a multiple of the chunk, window < chunk
    (1, 50, 2, 2, 32, 16, 20, 3, 16),   # window > chunk
    (1, 40, 2, 1, 16, 16, 64, 4, 16),   # window >= T: no linear part
    (1, 40, 4, 1, 16, 16, 7, 0, 16),    # no sinks, GQA group 4
    (1, 70, 2, 1, 16, 32, 16, 16, 16),  # sinks == window == chunk
    (1, 45, 2, 2, 64, 32, 9, 1, 32),    # D 64, chunk 32
]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def shape_id(s):
    return "B{}-T{}-H{}-KV{}-D{}-F{}-W{}-S{}-C{}".format(*s)


def rel_err(x, ref):
    """||x - ref|| / ||ref||; a reference gradient of (near) zero norm is compared absolutely."""
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-3)).item()


def make_inputs(b, t, h, hkv, d, f, seed=0):
    """Random float64 inputs; feature maps non-negative, gates in (0.1, 0.9)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    fmap = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64) + 0.05  # noqa: E731
    return [r(b, t, h, d), r(b, t, hkv, d), r(b, t, hkv, d), fmap(b, t, h, f), fmap(b, t, hkv, f),
            torch.rand(h, generator=gen, dtype=torch.float64) * 0.8 + 0.1]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the kernels allocate starts as NaN (or a bad index), so unwritten parts show."""
    def nan_empty(*shape, like, dtype=None):
        dt = dtype or like.dtype
        fill = float("nan") if dt.is_floating_point else -12345
        return torch.full(shape, fill, device=like.device, dtype=dt)
    monkeypatch.setattr(chunk, "_empty", nan_empty)


def _reference(xs, window, sinks, start=None):
    xs = [x.clone().requires_grad_() for x in xs]
    out = lswa_naive(*xs, window, sinks, start=start)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(do)
    return out.detach(), [x.grad for x in xs], do


def _run_chunk(xs, do, window, sinks, c, dtype, start=None):
    ys = [x.to(DEVICE, dtype).requires_grad_() for x in xs]
    out = chunk.lswa_chunk(*ys, window, sinks, chunk_size=c, start=start)
    out.backward(do.to(DEVICE, dtype))
    return out.detach().cpu(), [y.grad.cpu() for y in ys]


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_chunk_fp32_forward_and_grads(shape):
    b, t, h, hkv, d, f, w, s, c = shape
    xs = make_inputs(b, t, h, hkv, d, f)
    ref, grads, do = _reference(xs, w, s)
    out, got = _run_chunk(xs, do, w, s, c, torch.float32)
    assert rel_err(out, ref) < TOL[torch.float32]
    for name, g, r in zip(["q", "k", "v", "fq", "fk", "gate"], got, grads):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) < 10 * TOL[torch.float32], name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]], ids=shape_id)
def test_chunk_low_precision(shape, dtype):
    b, t, h, hkv, d, f, w, s, c = shape
    # reference on the rounded inputs: the max's gradient jumps where rounding flips an arg-max
    xs = [x.to(dtype).double() for x in make_inputs(b, t, h, hkv, d, f, seed=2)]
    ref, grads, do = _reference(xs, w, s)
    out, got = _run_chunk(xs, do, w, s, c, dtype)
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    for name, g, r in zip(["q", "k", "v", "fq", "fk", "gate"], got, grads):
        assert rel_err(g, r) < 2 * TOL[dtype], name


def test_max_gradient_is_not_detached():
    """The window max is part of the function: a detached max gives visibly wrong dq/dk."""
    b, t, h, hkv, d, f, w, s, c = SHAPES[0]
    xs = make_inputs(b, t, h, hkv, d, f, seed=3)
    xs[0] = xs[0] * 3  # peaked scores: the max's gradient matters
    ref, grads, do = _reference(xs, w, s)
    _, got = _run_chunk(xs, do, w, s, c, torch.float32)
    assert rel_err(got[0], grads[0]) < 1e-4 and rel_err(got[1], grads[1]) < 1e-4


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[4]], ids=shape_id)
def test_prefill_state_matches_naive(shape):
    b, t, h, hkv, d, f, w, s, c = shape
    xs = [x.to(DEVICE, torch.float32) for x in make_inputs(b, t, h, hkv, d, f, seed=4)]
    _, st = chunk.lswa_chunk(*xs, w, s, return_state=True, chunk_size=c)
    ref = lswa_state_from_prefill(xs[1], xs[2], xs[4], w, s)
    for name, a in vars(st).items():
        r = getattr(ref, name)
        assert a.shape == r.shape and a.dtype == r.dtype, name
        assert torch.allclose(a.double(), r.double(), rtol=1e-5, atol=1e-5), name


def test_chunk_extreme_masked_scores():
    """Masked scores 1e4 above the softmax max (inf under exp2 in fp32) never reach an exponent:
    output and every gradient finite and equal to the extreme-free reference."""
    xs, big_q, big_k = extreme_inputs(*EXTREME_SHAPE, EXTREME_PAIRS)
    ref, grads, do = extreme_reference(xs, big_q, big_k, 5, 2)
    out, got = _run_chunk([big_q, big_k, *xs[2:]], do, 5, 2, 16, torch.float32)
    assert torch.isfinite(out).all() and rel_err(out, ref) < TOL[torch.float32]
    for name, g, r in zip(["q", "k", "v", "fq", "fk", "gate"], got, grads):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) < 10 * TOL[torch.float32], name


@pytest.mark.parametrize("case", PAD_CASES, ids=pad_id)
def test_chunk_left_padding(case):
    """Left-padded batch (garbage in the padding) == the padded reference, row by row on the real
    tokens (the reference equals each row alone there); padding outputs and gradients are 0."""
    (b, t, h, hkv, d, f, w, s), starts = case
    xs, start = left_pad(make_inputs(b, t, h, hkv, d, f, seed=9), starts)
    ref, grads, do = _reference(xs, w, s, start)
    out, got = _run_chunk(xs, do, w, s, 16, torch.float32, start.to(DEVICE))
    for row, s0 in enumerate(starts):
        assert rel_err(out[row, s0:], ref[row, s0:]) < TOL[torch.float32], row
        assert (out[row, :s0] == 0).all(), row
        for name, g, r in zip(["q", "k", "v", "fq", "fk"], got, grads):
            assert rel_err(g[row, s0:], r[row, s0:]) < 10 * TOL[torch.float32], (row, name)
            assert (g[row, :s0] == 0).all(), (row, name)
    assert rel_err(got[5], grads[5]) < 10 * TOL[torch.float32]


@pytest.mark.parametrize("case", PAD_CASES, ids=pad_id)
def test_left_padded_prefill_state_matches_naive(case):
    (b, t, h, hkv, d, f, w, s), starts = case
    xs, start = left_pad(make_inputs(b, t, h, hkv, d, f, seed=10), starts)
    xs = [x.to(DEVICE, torch.float32) for x in xs]
    _, st = chunk.lswa_chunk(*xs, w, s, return_state=True, chunk_size=16, start=start.to(DEVICE))
    ref = lswa_state_from_prefill(xs[1], xs[2], xs[4], w, s, start=start.to(DEVICE))
    for name, a in vars(st).items():
        r = getattr(ref, name)
        assert a.shape == r.shape and a.dtype == r.dtype, name
        assert torch.allclose(a.double(), r.double(), rtol=1e-5, atol=1e-5), name
