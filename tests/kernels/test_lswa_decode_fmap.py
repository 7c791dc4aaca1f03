"""Decode step with the Hedgehog feature map inside (``lswa_decode_fmap``): the naive reference decodes
like the full forward on Hedgehog features; the fused Triton kernel equals the reference and equals the
two launches it replaces (``feature_map`` then ``lswa_decode``), output and state, over GQA groups,
window wrap-around, sinks not yet full, rows at different positions, fp32 and bf16; ops dispatch.

Compiled on a GPU (marked ``gpu``), under the Triton interpreter on CPU: see triton_mode.py.
"""
import pytest
import torch
from triton_mode import DEVICE, INTERPRET, pytestmark  # noqa: F401 - first: it sets the Triton mode

from lbsearch.kernels.fused_decode.naive import feature_map_naive  # noqa: E402
from lbsearch.kernels.lswa import ops  # noqa: E402
from lbsearch.kernels.lswa.naive import lswa_decode_fmap_naive, lswa_naive, lswa_state_from_prefill  # noqa: E402
from test_lswa_decode import cat_states, clone_state, rel_err, shape_id  # noqa: E402

# (B, T, H, Hkv, D, F, window, sinks): T tokens in total, decoded from staggered start points
SHAPES = [
    (2, 23, 4, 2, 16, 8, 5, 2),  # GQA 2, wrap-around, sinks filled while decoding
    (3, 30, 2, 2, 32, 12, 8, 0),  # no GQA, no sinks, F/2 = 6 (masked feature columns)
    (2, 20, 4, 1, 16, 16, 32, 4),  # window >= T: nothing leaves the window
    (2, 40, 2, 1, 16, 16, 20, 16),  # ring over two blocks of 16, many sinks
    (2, 14, 8, 2, 64, 64, 6, 1),  # head dim 64, F/2 = 32 (a real layer's sizes)
]


def make_inputs(b, t, h, hkv, d, f, seed=0):
    """q [B,T,H,D], k/v [B,T,Hkv,D] (float64), the feature map's weight [Hkv, D, F/2], gate [H]."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    return [r(b, t, h, d), r(b, t, hkv, d), r(b, t, hkv, d), r(hkv, d, f // 2) * 0.4,
            torch.rand(h, generator=gen, dtype=torch.float64) * 0.8 + 0.1]


def features(x, weight):
    """Hedgehog features of x [B, T, heads, D] (the reference's feature map, per token)."""
    b, t, h, d = x.shape
    flat = x.transpose(0, 1).reshape(t * b, h, d)
    fx = feature_map_naive(flat, flat, weight)[0]
    return fx.view(t, b, h, -1).transpose(0, 1)


def staggered_state(xs, window, sinks, starts, dtype):
    """Row i prefilled with its first starts[i] tokens (naive), state tensors in ``dtype``."""
    k, v, w = xs[1], xs[2], xs[3]
    fk = features(k, w)
    st = cat_states([lswa_state_from_prefill(k[i:i + 1, :s0], v[i:i + 1, :s0], fk[i:i + 1, :s0], window, sinks)
                     for i, s0 in enumerate(starts)])
    return clone_state(st, dtype=dtype)


def step_inputs(xs, pos, dtype, device="cpu"):
    """q, k, v of each row's token at its own position, then the weight and gate (in ``dtype``)."""
    idx, rows = torch.as_tensor(pos), torch.arange(len(pos))
    return [x[rows, idx].to(device, dtype) for x in xs[:3]] + [x.to(device, dtype) for x in xs[3:]]


def state_err(st, ref):
    return {name: rel_err(a.cpu(), getattr(ref, name).cpu()) for name, a in vars(st).items()}


@pytest.mark.parametrize("shape", SHAPES[:3], ids=shape_id)
def test_naive_fmap_decode_equals_full_forward(shape):
    b, t, h, hkv, d, f, w, s = shape
    xs = make_inputs(b, t, h, hkv, d, f)
    q, k, v, weight, gate = xs
    full = lswa_naive(q, k, v, features(q, weight), features(k, weight), gate, w, s)
    starts = [(3 * i) % 7 for i in range(b)]
    st = staggered_state(xs, w, s, starts, torch.float64)
    for n in range(t - max(starts)):
        pos = [s0 + n for s0 in starts]
        out = lswa_decode_fmap_naive(*step_inputs(xs, pos, torch.float64), st)
        assert rel_err(out, full[torch.arange(b), torch.as_tensor(pos)]) < 1e-6, n  # lin_s is float32


@pytest.fixture
def poison(monkeypatch):
    from lbsearch.kernels.lswa import fused_recurrent

    monkeypatch.setattr(fused_recurrent, "_empty_like", lambda x: torch.full_like(x, float("nan")))


def decode_all(xs, shape, dtype, seed_starts, step):
    """Decode every remaining token with ``step(q, k, v, weight, gate, state)``; outputs and final state."""
    b, t, *_, w, s = shape
    starts = [(seed_starts * i) % 9 for i in range(b)]
    st = clone_state(staggered_state(xs, w, s, starts, dtype), device=DEVICE)
    outs = [step(*step_inputs(xs, [s0 + n for s0 in starts], dtype, DEVICE), st) for n in range(t - max(starts))]
    return torch.stack(outs).cpu(), st


def two_ops_triton(q, k, v, weight, gate, st):
    """Today's fused-engine path: the feature-map kernel, then the decode kernel."""
    from lbsearch.kernels.fused_decode.fused import feature_map_fused
    from lbsearch.kernels.lswa.fused_recurrent import lswa_decode_fused

    fq, fk = feature_map_fused(q, k, weight)
    return lswa_decode_fused(q, k, v, fq, fk, gate, st)


def fmap_fused(*args):
    from lbsearch.kernels.lswa.fused_fmap import lswa_decode_fmap_fused

    return lswa_decode_fmap_fused(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_fused_fmap_equals_naive_and_two_op_path(shape, dtype, poison):
    xs = make_inputs(*shape[:6], seed=1)
    out, st = decode_all(xs, shape, dtype, 5, fmap_fused)
    ref, st_ref = decode_all(xs, shape, dtype, 5, lswa_decode_fmap_naive)
    two, st_two = decode_all(xs, shape, dtype, 5, two_ops_triton)
    assert out.dtype == dtype and not out.isnan().any()
    if dtype == torch.float32:
        assert rel_err(out, ref) < 1e-5 and rel_err(out, two) < 1e-5
        assert max(state_err(st, st_ref).values()) < 1e-5 and max(state_err(st, st_two).values()) < 1e-5
        return
    # bf16: keys/values are moved, not computed; the features are rounded once into ring_fk (the
    # interpreter truncates where PyTorch rounds, hence the reference's looser state tolerance)
    assert rel_err(out, ref) < 2e-2 and rel_err(out, two) < 1e-2
    for name in ("sink_k", "sink_v", "ring_k", "ring_v", "pos"):
        assert torch.equal(getattr(st, name).cpu(), getattr(st_ref, name).cpu()), name
    errs, errs_two = state_err(st, st_ref), state_err(st, st_two)
    for name in ("ring_fk", "lin_s", "lin_z"):
        assert errs[name] < (1e-2 if INTERPRET else 4e-3), (name, errs)
        assert errs_two[name] < 4e-3, (name, errs_two)


def test_dispatch_and_shape_check(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    shape = (2, 9, 4, 2, 16, 8, 4, 1)
    xs = make_inputs(*shape[:6], seed=2)
    torch_out, torch_st = decode_all(xs, shape, torch.float32, 2,
                                     lambda *a: ops.lswa_decode_fmap(*a, backend="torch"))
    ref, _ = decode_all(xs, shape, torch.float32, 2, lswa_decode_fmap_naive)
    assert torch.equal(torch_out, ref)
    tri_out, _ = decode_all(xs, shape, torch.float32, 2, lambda *a: ops.lswa_decode_fmap(*a, backend="triton"))
    assert rel_err(tri_out, ref) < 1e-5
    q, k, v, weight, gate = step_inputs(xs, [0, 0], torch.float32, DEVICE)
    st = clone_state(torch_st, device=DEVICE)
    with pytest.raises(ValueError, match="does not map"):
        fmap_fused(q, k, v, weight[..., :2], gate, st)
