"""The float64 LSWA reference itself: gradcheck, finite gradients under extreme masked scores, and
left padding (``start``) equal to each row run alone. The chunk and decode tests build on it.
"""
import pytest
import torch
import torch.nn.functional as fn

from lbsearch.kernels.lswa.naive import LSWAState, lswa_naive, lswa_state_from_prefill

NAMES = ["q", "k", "v", "fq", "fk", "gate"]


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-3)).item()


def make_inputs(b, t, h, hkv, d, f, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    fmap = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64) + 0.05  # noqa: E731
    return [r(b, t, h, d), r(b, t, hkv, d), r(b, t, hkv, d), fmap(b, t, h, f), fmap(b, t, hkv, f),
            torch.rand(h, generator=gen, dtype=torch.float64) * 0.8 + 0.1]


def left_pad(xs, starts, seed=7):
    """Row b's first starts[b] tokens replaced by large garbage (huge masked scores): no leaks."""
    gen = torch.Generator().manual_seed(seed)
    xs = [x.clone() for x in xs]
    for x in xs[:5]:
        for b, s in enumerate(starts):
            x[b, :s] = 1e3 * torch.rand(x[b, :s].shape, generator=gen, dtype=x.dtype)
    return xs, torch.tensor(starts)


def run(xs, window, sinks, start=None, do=None):
    """Output, every input gradient for output gradient ``do`` (random if None), and ``do``."""
    xs = [x.clone().requires_grad_() for x in xs]
    out = lswa_naive(*xs, window, sinks, start=start)
    if do is None:
        do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    out.backward(do)
    return out.detach(), [x.grad for x in xs], do


@pytest.mark.parametrize("starts", [None, [0, 2, 6]], ids=["unpadded", "padded"])
def test_gradcheck(starts):
    """float64 gradcheck in every input; feature maps kept positive through softplus."""
    b, t, h, hkv, d, f, w, s = 3, 7, 2, 1, 4, 3, 3, 1
    xs = make_inputs(b, t, h, hkv, d, f, seed=5)
    xs = [x.requires_grad_() for x in xs]
    start = None if starts is None else torch.tensor(starts)

    def fun(q, k, v, fq, fk, gate):
        return lswa_naive(q, k, v, fn.softplus(fq), fn.softplus(fk), gate, w, s, start=start)

    assert torch.autograd.gradcheck(fun, xs)


def extreme_inputs(b, t, h, hkv, d, f, pairs, seed=0):
    """Inputs whose dimension 0 is used only by the pairs (query i, key j) in ``pairs``, giving
    each a score 1e4 above the rest; and the extreme q / k apart (dimension 0 zero elsewhere).

    Every pair is masked, so no score changes and the output equals that of ``xs``. Gradients
    (given the same output gradient) equal the extreme-free references: dq that of (q, big k),
    dk that of (big q, k), where a query's dimension 0 meets only zeros (or the other way round).
    """
    xs = make_inputs(b, t, h, hkv, d, f, seed)
    xs[0][..., 0] = 0
    xs[1][..., 0] = 0
    big_q, big_k = xs[0].clone(), xs[1].clone()
    for i, j in pairs:
        big_q[:, i, :, 0] = 200.0
        big_k[:, j, :, 0] = 200.0 * d ** 0.5 / 4  # scale * 200 * this = 1e4
    return xs, big_q, big_k


# (query, key) pairs for T=37, window 5, sinks 2. Every cross pair (q_i of one, k_j of another)
# is masked too: linear keys inside the query's exact 16-block range (36, 20) and below it, in the
# prefix state (36, 3), and future keys in the query's own block (10, 12) or later (10, 20)
EXTREME_PAIRS = [(36, 20), (30, 3), (10, 12)]
EXTREME_SHAPE = (2, 37, 4, 2, 16, 8)


def extreme_reference(xs, big_q, big_k, window, sinks):
    """Output, expected gradients (see ``extreme_inputs``) and the output gradient used."""
    ref, grads, do = run(xs, window, sinks)
    grads[0] = run([xs[0], big_k, *xs[2:]], window, sinks, do=do)[1][0]
    grads[1] = run([big_q, *xs[1:]], window, sinks, do=do)[1][1]
    return ref, grads, do


def test_extreme_masked_scores():
    """Masked scores 1e4 above the softmax max: forward and every gradient stay finite and equal
    the extreme-free references (masked scores are not part of the function)."""
    xs, big_q, big_k = extreme_inputs(*EXTREME_SHAPE, EXTREME_PAIRS)
    ref, ref_g, do = extreme_reference(xs, big_q, big_k, 5, 2)
    assert ref_g[0][..., 0].abs().max() > 1 and ref_g[1][..., 0].abs().max() > 1  # not trivial
    out, got, _ = run([big_q, big_k, *xs[2:]], 5, 2, do=do)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-12
    for name, g, r in zip(NAMES, got, ref_g):
        assert torch.isfinite(g).all() and rel_err(g, r) < 1e-12, name


# (B, T, H, Hkv, D, F, window, sinks) and per-row left padding: none, > window, sinks across a
# 16-token block boundary (30), fewer real tokens than sinks, T - 1. With chunks of 16, late query
# blocks see the sinks of start 9 (block 0) and 30 (block 1, partly) below their exact key range,
# those of start 27 (window 20) inside it.
PAD_CASES = [
    ((5, 64, 2, 1, 16, 8, 5, 3), [0, 9, 30, 62, 63]),
    ((4, 50, 2, 1, 16, 16, 20, 4), [0, 3, 27, 49]),
    ((3, 40, 2, 2, 16, 8, 7, 0), [0, 12, 39]),
]


def pad_id(case):
    shape, starts = case
    return "B{}-T{}-H{}-KV{}-D{}-F{}-W{}-S{}-start".format(*shape) + "_".join(map(str, starts))


def rows_alone(xs, starts, window, sinks, do):
    """Reference of each row run alone on its real tokens: outputs and grads, per row."""
    res = []
    for b, s in enumerate(starts):
        row = [x[b:b + 1, s:] for x in xs[:5]] + [xs[5]]
        res.append(run(row, window, sinks, do=do[b:b + 1, s:])[:2])
    return res


@pytest.mark.parametrize("case", PAD_CASES, ids=pad_id)
def test_left_padding_equals_rows_alone(case):
    (b, t, h, hkv, d, f, w, s), starts = case
    xs, start = left_pad(make_inputs(b, t, h, hkv, d, f, seed=6), starts)
    out, grads, do = run(xs, w, s, start=start)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    alone = rows_alone(xs, starts, w, s, do)
    for row, (s0, (ref, ref_g)) in enumerate(zip(starts, alone)):
        assert rel_err(out[row:row + 1, s0:], ref) < 1e-12, row
        assert (out[row, :s0] == 0).all(), row
        for name, g, r in zip(NAMES, grads, ref_g):
            if name != "gate":
                assert rel_err(g[row:row + 1, s0:], r) < 1e-12, (row, name)
                assert (g[row, :s0] == 0).all(), (row, name)
    assert rel_err(grads[5], sum(r[1][5] for r in alone)) < 1e-12


@pytest.mark.parametrize("case", PAD_CASES, ids=pad_id)
def test_left_padded_state_equals_rows_alone(case):
    (b, t, h, hkv, d, f, w, s), starts = case
    xs, start = left_pad(make_inputs(b, t, h, hkv, d, f, seed=8), starts)
    st = lswa_state_from_prefill(xs[1], xs[2], xs[4], w, s, start=start)
    alone = [lswa_state_from_prefill(xs[1][i:i + 1, s0:], xs[2][i:i + 1, s0:],
                                     xs[4][i:i + 1, s0:], w, s) for i, s0 in enumerate(starts)]
    ref = LSWAState(*(torch.cat([getattr(a, n) for a in alone]) for n in vars(st)))
    assert torch.equal(st.pos, torch.tensor([t - s0 for s0 in starts]))
    for name, a in vars(st).items():
        r = getattr(ref, name)
        assert a.shape == r.shape and a.dtype == r.dtype, name
        assert rel_err(a, r) < 1e-6, name  # lin_s / lin_z are float32 sums
