"""Wide-row top-p: the Triton kernel equals the full-sort reference bit for bit (rows whose nucleus fits
keep their token), and the reference equals the sampler's own full sort.

Compiled on a GPU (marked ``gpu``), under the Triton interpreter on CPU: see triton_mode.py.
"""
import pytest
import torch
from triton_mode import DEVICE, pytestmark  # noqa: F401 - first: it sets the Triton mode

from lbsearch import sampling  # noqa: E402
from lbsearch.kernels.top_p import top_p_wide_rows, top_p_wide_rows_naive  # noqa: E402
from lbsearch.kernels.top_p.wide_rows import top_p_wide_rows_triton  # noqa: E402
from lbsearch.sampling import Sampling  # noqa: E402


def batch(v=3000):
    g = torch.Generator().manual_seed(2)
    peaked = torch.randn(4, v, generator=g) * 4
    flat = torch.randn(1, v, generator=g) * 0.1
    return torch.cat([peaked, flat, torch.zeros(1, v), peaked[:1] * 0.05])  # rows 4..6: wide nuclei


@pytest.mark.parametrize("setting", [Sampling(0.8, top_p=0.9), Sampling(1.0, top_k=100, top_p=0.7)], ids=str)
def test_kernel_equals_reference(setting):
    logits = batch()
    probs = sampling._scaled(logits, setting).softmax(-1)
    bound = sampling._mass_bound(setting.top_p)
    log_u = torch.rand(probs.shape, generator=torch.Generator().manual_seed(1)).log()
    tokens, fits = sampling._candidates(probs, log_u, bound, 60)
    assert fits[:4].all() and not fits[4:].any()
    ref = tokens.clone()
    top_p_wide_rows_naive(probs, log_u, fits, ref, bound)
    assert torch.equal(ref, sampling._full_sort(probs, log_u, bound))  # the reference is the full sort
    assert torch.equal(ref[fits], tokens[fits])
    got = tokens.clone().to(DEVICE)
    top_p_wide_rows_triton(probs.to(DEVICE), log_u.to(DEVICE), fits.to(DEVICE), got, bound, block=1024)
    assert torch.equal(got.cpu(), ref)
    again = tokens.clone()
    top_p_wide_rows(probs, log_u, fits, again, bound)  # dispatch: the reference on CPU
    assert torch.equal(again, ref)
