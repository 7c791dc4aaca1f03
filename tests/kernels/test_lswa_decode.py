"""Decode chain: naive step-by-step == naive full forward; fused Triton step == naive step;
chunk prefill's state continued by decode steps == naive full forward; a left-padded prefill
continued by decode steps == each row alone; ops dispatch.

Compiled on a GPU (marked ``gpu``), under the Triton interpreter on CPU: see triton_mode.py.
"""
import pytest
import torch
from triton_mode import DEVICE, pytestmark  # noqa: F401 - first: it sets the Triton mode

from lbsearch.kernels.lswa import ops  # noqa: E402
from lbsearch.kernels.lswa.naive import (LSWAState, lswa_decode_naive, lswa_naive,  # noqa: E402
                                         lswa_state_from_prefill)
from test_lswa_naive import left_pad  # noqa: E402


# (B, T, H, Hkv, D, F, window, sinks): T tokens in total, decoded from different start points
SHAPES = [
    (2, 23, 4, 2, 16, 8, 5, 2),
    (3, 30, 2, 2, 32, 16, 8, 0),
    (2, 20, 4, 1, 16, 16, 32, 4),  # window >= T
    (2, 40, 2, 1, 16, 16, 20, 16),  # ring split over two blocks of 16, many sinks
]


def shape_id(s):
    return "B{}-T{}-H{}-KV{}-D{}-F{}-W{}-S{}".format(*s)


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-3)).item()


def make_inputs(b, t, h, hkv, d, f, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    fmap = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64) + 0.05  # noqa: E731
    return [r(b, t, h, d), r(b, t, hkv, d), r(b, t, hkv, d), fmap(b, t, h, f), fmap(b, t, hkv, f),
            torch.rand(h, generator=gen, dtype=torch.float64) * 0.8 + 0.1]


def cat_states(states):
    """Batch per-sequence states (they may have different positions)."""
    return LSWAState(*(torch.cat([getattr(s, n) for s in states]) for n in vars(states[0])))


def clone_state(st, dtype=None, device=None):
    def cv(name, x):
        keep = name in ("lin_s", "lin_z", "pos") or dtype is None
        return x.to(device=device or x.device, dtype=x.dtype if keep else dtype).clone()
    return LSWAState(*(cv(n, x) for n, x in vars(st).items()))


def staggered_state(xs, window, sinks, starts):
    """Sequence i prefilled with its first starts[i] tokens (naive)."""
    k, v, fk = xs[1], xs[2], xs[4]
    return cat_states([lswa_state_from_prefill(k[i:i + 1, :s0], v[i:i + 1, :s0],
                                               fk[i:i + 1, :s0], window, sinks)
                       for i, s0 in enumerate(starts)])


def step_inputs(xs, pos):
    """The token at each sequence's own position: q [B,H,D] ... ."""
    idx = torch.as_tensor(pos)
    bi = torch.arange(len(idx))
    return [x[bi, idx] for x in xs[:5]] + [xs[5]]


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_naive_decode_equals_full_forward(shape):
    b, t, h, hkv, d, f, w, s = shape
    xs = make_inputs(b, t, h, hkv, d, f)
    full = lswa_naive(*xs, w, s)
    starts = [(3 * i) % 7 for i in range(b)]
    st = staggered_state(xs, w, s, starts)
    for n in range(t - max(starts)):
        pos = [s0 + n for s0 in starts]
        out = lswa_decode_naive(*step_inputs(xs, pos), st)
        ref = full[torch.arange(b), torch.as_tensor(pos)]
        assert rel_err(out, ref) < 1e-6, n  # the state keeps lin_s in float32


@pytest.fixture
def poison(monkeypatch):
    from lbsearch.kernels.lswa import fused_recurrent
    monkeypatch.setattr(fused_recurrent, "_empty_like", lambda x: torch.full_like(x, float("nan")))
    return fused_recurrent


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_fused_decode_equals_naive_decode(shape, dtype, poison):
    b, t, h, hkv, d, f, w, s = shape
    xs = make_inputs(b, t, h, hkv, d, f, seed=1)
    starts = [(5 * i) % 9 for i in range(b)]
    st_ref = clone_state(staggered_state(xs, w, s, starts), dtype=dtype)
    st = clone_state(st_ref, device=DEVICE)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for n in range(t - max(starts)):
        pos = [s0 + n for s0 in starts]
        inp = [x.to(dtype) for x in step_inputs(xs, pos)]
        ref = lswa_decode_naive(*inp, st_ref)
        out = poison.lswa_decode_fused(*(x.to(DEVICE) for x in inp), st)
        assert out.dtype == dtype and rel_err(out.cpu(), ref) < tol, n
    for name, a in vars(st).items():
        assert rel_err(a.cpu(), getattr(st_ref, name)) < 1e-6, name


@pytest.mark.parametrize("shape", [(2, 40, 4, 2, 16, 8, 5, 2), (1, 45, 2, 1, 32, 16, 20, 3)],
                         ids=shape_id)
def test_prefill_then_decode(shape):
    """Triton prefill of the first tokens, Triton decode of the rest == naive full forward."""
    b, t, h, hkv, d, f, w, s = shape
    xs = make_inputs(b, t, h, hkv, d, f, seed=2)
    full = lswa_naive(*xs, w, s)
    t0 = 29
    dev = [x.to(DEVICE, torch.float32) for x in xs]
    pre, st = ops.lswa(*(x[:, :t0] for x in dev[:5]), dev[5], w, s, backend="triton",
                       return_state=True)
    assert rel_err(pre.cpu(), full[:, :t0]) < 1e-5
    for n in range(t0, t):
        out = ops.lswa_decode(*(x[:, n] for x in dev[:5]), dev[5], st, backend="triton")
        assert rel_err(out.cpu(), full[:, n]) < 1e-5, n


# (B, T, H, Hkv, D, F, window, sinks), prefill length, per-row left padding of the prefill: none,
# > window, fewer real tokens than sinks, prefill length - 1
PAD_DECODE = [
    ((5, 30, 4, 2, 16, 8, 5, 3), 22, [0, 7, 13, 20, 21]),
    ((3, 45, 2, 1, 32, 16, 20, 3), 36, [0, 25, 35]),
]


def pad_decode_id(case):
    return shape_id(case[0]) + f"-T0{case[1]}-start" + "_".join(map(str, case[2]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", PAD_DECODE, ids=pad_decode_id)
def test_left_padded_prefill_then_decode(case, backend, poison, monkeypatch):
    """ops.lswa on a left-padded prefill, then ops.lswa_decode: the state equals each row's own
    prefill state and every real output equals the row run alone (naive, unpadded)."""
    from lbsearch.kernels.lswa import chunk

    def nan_empty(*shape, like, dtype=None):
        dt = dtype or like.dtype
        fill = float("nan") if dt.is_floating_point else -12345
        return torch.full(shape, fill, device=like.device, dtype=dt)
    monkeypatch.setattr(chunk, "_empty", nan_empty)
    (b, t, h, hkv, d, f, w, s), t0, starts = case
    xs = make_inputs(b, t, h, hkv, d, f, seed=3)
    pre, start = left_pad([x[:, :t0] for x in xs[:5]] + [xs[5]], starts)
    xs = [torch.cat([p, x[:, t0:]], 1) for p, x in zip(pre[:5], xs[:5])] + [xs[5]]
    alone = [lswa_naive(*(x[i:i + 1, s0:] for x in xs[:5]), xs[5], w, s)[0]
             for i, s0 in enumerate(starts)]
    ref_st = cat_states([lswa_state_from_prefill(xs[1][i:i + 1, s0:t0], xs[2][i:i + 1, s0:t0],
                                                 xs[4][i:i + 1, s0:t0], w, s)
                         for i, s0 in enumerate(starts)])
    dt, tol = (torch.float64, 1e-12) if backend == "torch" else (torch.float32, 1e-5)
    dev = [x.to(DEVICE, dt) for x in xs]
    out, st = ops.lswa(*(x[:, :t0] for x in dev[:5]), dev[5], w, s, backend=backend,
                       return_state=True, start=start.to(DEVICE))
    for name, a in vars(st).items():
        assert rel_err(a.cpu(), getattr(ref_st, name)) < 1e-6, name
    for i, s0 in enumerate(starts):
        assert rel_err(out[i, s0:].cpu(), alone[i][:t0 - s0]) < tol, i
        assert (out[i, :s0] == 0).all(), i
    for n in range(t0, t):
        out = ops.lswa_decode(*(x[:, n] for x in dev[:5]), dev[5], st, backend=backend)
        for i, s0 in enumerate(starts):
            assert rel_err(out[i].cpu(), alone[i][n - s0]) < max(tol, 1e-6), (n, i)  # fp32 lin_s


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    assert ops.resolve_backend(None, cpu) == "torch"
    assert ops.resolve_backend("triton", cpu) == "triton"
    monkeypatch.setenv(ops.ENV_VAR, "triton")
    assert ops.resolve_backend(None, cpu) == "triton"
    assert ops.resolve_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError):
        ops.resolve_backend("cuda-magic", cpu)


def test_torch_backend_is_naive():
    xs = make_inputs(1, 12, 2, 1, 16, 8)
    out, st = ops.lswa(*xs, 4, 1, backend="torch", return_state=True)
    assert torch.equal(out, lswa_naive(*xs, 4, 1))
    assert int(st.pos[0]) == 12
