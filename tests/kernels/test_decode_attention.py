"""Decode attention: the Triton split-KV kernel equals the PyTorch reference, which equals plain
softmax attention over each sequence's filled rows; unwritten outputs are caught by NaN poisoning.

Compiled on a GPU (marked ``gpu``), under the Triton interpreter on CPU: see triton_mode.py.
"""
import pytest
import torch
from triton_mode import DEVICE, pytestmark  # noqa: F401 - first: it sets the Triton mode

from lbsearch.kernels import decode_attention as da  # noqa: E402
from lbsearch.kernels.decode_attention import split_kv  # noqa: E402


# (B, H, Hkv, D, L, splits): L allocated rows; sequences filled to different lengths
SHAPES = [
    (2, 4, 2, 16, 40, 1),
    (3, 6, 2, 32, 130, 3),  # 3 query heads per kv head (padded group), splits of 64 rows
    (2, 8, 1, 64, 300, 4),  # one kv head for all, some splits past short sequences
    (1, 2, 2, 16, 17, 2),  # no grouping, odd length
]


def shape_id(s):
    return "B{}-H{}-KV{}-D{}-L{}-NS{}".format(*s)


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-6)).item()


def make_inputs(b, h, hkv, d, length, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, d, generator=gen)
    k = torch.randn(b, hkv, length, d, generator=gen)
    v = torch.randn(b, hkv, length, d, generator=gen)
    lens = torch.randint(1, length + 1, (b,), generator=gen)
    lens[0] = length  # one sequence fills the cache
    k[:, :, -1] = float("nan")  # rows past a shorter length must not be read (NaN would spread)
    return [x.to(DEVICE, dtype) for x in (q, k, v)] + [lens.to(DEVICE)]


def plain_attention(q, k, v, lens, scale):
    """Per sequence and head, softmax over the filled rows (float64)."""
    b, h, d = q.shape
    group = h // k.shape[1]
    out = torch.empty(b, h, d, dtype=torch.float64, device=q.device)
    for i in range(b):
        n = int(lens[i])
        for j in range(h):
            kk, vv = k[i, j // group, :n].double(), v[i, j // group, :n].double()
            out[i, j] = torch.softmax(kk @ q[i, j].double() * scale, 0) @ vv
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_naive_equals_plain_attention(shape):
    b, h, hkv, d, length, _ = shape
    q, k, v, lens = make_inputs(b, h, hkv, d, length, torch.float64)
    k[0, :, -1] = 0.0  # sequence 0 uses its last row
    out = da.decode_attention_naive(q, k, v, lens, scale=0.3)
    assert rel_err(out, plain_attention(q, k, v, lens, 0.3)) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_split_kv_equals_naive(shape, dtype, monkeypatch):
    b, h, hkv, d, length, splits = shape
    q, k, v, lens = make_inputs(b, h, hkv, d, length, dtype)
    k[0, :, -1] = 0.0
    monkeypatch.setattr(split_kv, "_empty", lambda s, dt, dev: torch.full(s, float("nan"), dtype=dt, device=dev))
    out = split_kv.decode_attention_split_kv(q, k, v, lens, scale=d ** -0.5, splits=splits, block_n=16)
    ref = da.decode_attention_naive(q.double(), k.double(), v.double(), lens)
    assert not out.isnan().any()
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_dispatch_and_split_choice():
    q, k, v, lens = make_inputs(2, 4, 2, 16, 40, torch.float32)
    k[0, :, -1] = 0.0
    ref = da.decode_attention_naive(q, k, v, lens)
    assert rel_err(da.decode_attention(q, k, v, lens, backend="triton"), ref) < 1e-5
    assert da.resolve_backend(None, torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="unknown decode-attention backend"):
        da.decode_attention(q, k, v, lens, backend="cuda")
    # splits: enough programs for the GPU, none shorter than MIN_SPLIT_ROWS, one for big batches
    assert split_kv.num_splits(1, 8, 4096, torch.device("cpu")) == 2
    assert split_kv.num_splits(200, 8, 1280, torch.device("cpu")) == 1
    assert split_kv.num_splits(1, 1, 100, torch.device("cpu")) == 1
