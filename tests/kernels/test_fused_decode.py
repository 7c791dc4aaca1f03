"""Fused decode glue: each Triton kernel equals its PyTorch reference (bit for bit where the roundings
are the model's: norms, RoPE, cache writes), and the references equal the model's own modules.

Compiled on a GPU (marked ``gpu``), under the Triton interpreter on CPU: see triton_mode.py.
"""
import pytest
import torch
from triton_mode import DEVICE, pytestmark  # noqa: F401 - first: it sets the Triton mode

from lbsearch.kernels import fused_decode as fd  # noqa: E402
from lbsearch.kernels.fused_decode import fused  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]


def rnd(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE, dtype)


def same(a, b, dtype):
    """Bit for bit where the hardware rounds like PyTorch (the interpreter truncates float32 -> bf16)."""
    return torch.equal(a, b) if DEVICE == "cuda" or dtype == torch.float32 else close(a, b, dtype)


def close(a, b, dtype):
    low = 2e-2 if DEVICE == "cuda" else 5e-2  # the interpreter truncates at each of up to 4 bf16 roundings
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=low, rtol=low)
    return a.dtype == b.dtype and a.shape == b.shape and torch.allclose(a.float(), b.float(), **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [64, 576, 100])
def test_rmsnorm_and_add(c, dtype):
    x, d, w = rnd(5, c, dtype=dtype), rnd(5, c, dtype=dtype, seed=1), rnd(c, dtype=dtype, seed=2)
    assert close(fused.rmsnorm_fused(x, w, 1e-5), fd.rmsnorm_naive(x, w, 1e-5), dtype)
    total, out = fused.add_rmsnorm_fused(x, d, w, 1e-6)
    ref_total, ref_out = fd.add_rmsnorm_naive(x, d, w, 1e-6)
    assert same(total, ref_total, dtype) and close(out, ref_out, dtype)


def test_rmsnorm_naive_is_hf():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(48, eps=1e-5).to(DEVICE, torch.bfloat16)
    norm.weight.data = rnd(48, dtype=torch.bfloat16, seed=3)
    x = rnd(4, 48, dtype=torch.bfloat16)
    assert torch.equal(fd.rmsnorm_naive(x, norm.weight, 1e-5), norm(x))


# (B, H, Hkv, D, L)
ROPE = [(3, 4, 2, 16, 20), (2, 9, 3, 64, 40), (1, 2, 2, 32, 7)]


def rope_inputs(b, h, hkv, d, length, dtype):
    qkv = rnd(b, (h + 2 * hkv) * d, dtype=dtype)
    ang = torch.arange(length)[:, None] * torch.linspace(0.05, 1.0, d // 2)[None]
    ang = torch.cat([ang, ang], -1)
    cos, sin = (f(ang).to(DEVICE, dtype) for f in (torch.cos, torch.sin))
    pos = torch.randint(0, length, (b,), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    return qkv, cos, sin, pos


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "qk-norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ROPE, ids=str)
def test_rope_qkv_and_cache_write(shape, dtype, norm):
    b, h, hkv, d, length = shape
    qkv, cos, sin, pos = rope_inputs(*shape, dtype)
    qn, kn = (rnd(d, dtype=dtype, seed=5), rnd(d, dtype=dtype, seed=6)) if norm else (None, None)
    got = fused.rope_qkv_fused(qkv, cos, sin, pos, h, hkv, qn, kn, 1e-6)
    ref = fd.rope_qkv_naive(qkv, cos, sin, pos, h, hkv, qn, kn, 1e-6)
    for g, r in zip(got, ref):
        assert close(g, r, dtype)
    assert same(got[2], ref[2], dtype)  # v is moved, not computed
    caches = [torch.full((b, hkv, length, d), float("nan"), device=DEVICE, dtype=dtype) for _ in range(4)]
    q = fused.rope_qkv_cache_fused(qkv, cos, sin, pos, h, hkv, caches[0], caches[1], qn, kn, 1e-6)
    q_ref = fd.rope_qkv_cache_naive(qkv, cos, sin, pos, h, hkv, caches[2], caches[3], qn, kn, 1e-6)
    assert close(q, q_ref, dtype)
    assert torch.equal(caches[0].isnan(), caches[2].isnan())  # the same rows written, no others
    assert close(caches[0].nan_to_num(), caches[2].nan_to_num(), dtype)
    assert same(caches[1].nan_to_num(), caches[3].nan_to_num(), dtype)


def test_rope_naive_is_the_models():
    """The reference is project_qkv's RoPE (and Qwen3's q/k norms) on a real attention module."""
    from conftest import tiny_model

    from lbsearch.attention.common import project_qkv

    model = tiny_model("qwen3", layers=1).to(DEVICE)
    attn = model.model.layers[0].self_attn
    x = rnd(3, 1, 64, seed=7)
    pos = torch.tensor([0, 5, 11], device=DEVICE)
    cos, sin = (t[0] for t in model.model.rotary_emb(x, torch.arange(20, device=DEVICE)[None]))
    ref = project_qkv(attn, x, (cos[pos][:, None], sin[pos][:, None]))
    qkv = torch.cat([attn.q_proj(x[:, 0]), attn.k_proj(x[:, 0]), attn.v_proj(x[:, 0])], -1)
    got = fd.rope_qkv_naive(qkv, cos, sin, pos, 4, 2, attn.q_norm.weight, attn.k_norm.weight,
                            attn.q_norm.variance_epsilon)
    for g, r in zip(got, ref):
        assert torch.allclose(g, r[:, 0], atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("i", [96, 1536, 70])
def test_silu_mul(i, dtype):
    gu = rnd(4, 2 * i, dtype=dtype, scale=3)
    assert close(fused.silu_mul_fused(gu), fd.silu_mul_naive(gu), dtype)


# (B, H, Hkv, D, F)
FMAP = [(3, 4, 2, 16, 8), (2, 9, 3, 64, 64), (2, 32, 8, 64, 32), (1, 2, 2, 32, 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FMAP, ids=str)
def test_feature_map(shape, dtype):
    b, h, hkv, d, f = shape
    q, k = rnd(b, h, d, dtype=dtype, seed=8), rnd(b, hkv, d, dtype=dtype, seed=9)
    w = rnd(hkv, d, f // 2, dtype=dtype, seed=10, scale=0.3)
    got, ref = fused.feature_map_fused(q, k, w), fd.feature_map_naive(q, k, w)
    for g, r in zip(got, ref):
        assert g.dtype == torch.float32 and torch.allclose(g, r, atol=1e-5, rtol=1e-4)


def test_feature_map_naive_is_hedgehog():
    from lbsearch.attention.lswa import HedgehogFeatureMap

    fmap = HedgehogFeatureMap(2, 16, 8).to(DEVICE)
    fmap.weight.data.normal_(0, 0.5, generator=torch.Generator(device=DEVICE).manual_seed(1))
    q, k = rnd(3, 4, 16, seed=11), rnd(3, 2, 16, seed=12)
    fq, fk = fd.feature_map_naive(q, k, fmap.weight)
    assert torch.equal(fq, fmap(q[:, None])[:, 0]) and torch.equal(fk, fmap(k[:, None])[:, 0])


def test_dispatch(monkeypatch):
    monkeypatch.delenv("LBSEARCH_FUSED_BACKEND", raising=False)
    assert fd.resolve_backend(None, torch.device("cpu")) == "torch"
    x, w = rnd(2, 32), rnd(32, seed=1)
    assert torch.allclose(fd.rmsnorm(x, w, 1e-6, backend="triton"), fd.rmsnorm(x, w, 1e-6), atol=1e-6)
    with pytest.raises(ValueError, match="unknown fused-decode backend"):
        fd.rmsnorm(x, w, 1e-6, backend="cuda")
