"""GPU check of the compiled Triton kernels against their references (relative errors, no timing).

Usage (CUDA machine): python benchmarks/check_kernels_gpu.py
Chunked LSWA (fp32 and bf16) against the float64 reference, the fused LSWA decode step against
the naive step, and split-KV decode attention against the naive one; prints one line each.
"""
import torch
from lbsearch.kernels.lswa.naive import lswa_naive, lswa_decode_naive, lswa_state_from_prefill
from lbsearch.kernels.lswa.chunk import lswa_chunk
from lbsearch.kernels.lswa.fused_recurrent import lswa_decode_fused
from lbsearch.kernels.decode_attention.naive import decode_attention_naive
from lbsearch.kernels.decode_attention.split_kv import decode_attention_split_kv
torch.manual_seed(0)
dev = "cuda"
b, t, h, hkv, d, f, w, s = 2, 300, 8, 2, 64, 32, 64, 4
q = torch.randn(b, t, h, d, device=dev); k = torch.randn(b, t, hkv, d, device=dev); v = torch.randn(b, t, hkv, d, device=dev)
fq = torch.rand(b, t, h, f, device=dev).softmax(-1); fk = torch.rand(b, t, hkv, f, device=dev).softmax(-1)
gate = torch.rand(h, device=dev)
ref = lswa_naive(*(x.double() for x in (q, k, v, fq, fk, gate)), w, s)
for dt in (torch.float32, torch.bfloat16):
    out = lswa_chunk(*(x.to(dt) for x in (q, k, v, fq, fk)), gate, w, s)
    print("chunk", dt, ((out.double() - ref).norm() / ref.norm()).item())
st_ref = lswa_state_from_prefill(k[:, :-1], v[:, :-1], fk[:, :-1], w, s)
st = lswa_state_from_prefill(k[:, :-1], v[:, :-1], fk[:, :-1], w, s)
a = lswa_decode_naive(q[:, -1], k[:, -1], v[:, -1], fq[:, -1], fk[:, -1], gate, st_ref)
c = lswa_decode_fused(q[:, -1], k[:, -1], v[:, -1], fq[:, -1], fk[:, -1], gate, st)
print("decode fused rel err", ((c.double() - a.double()).norm() / a.double().norm()).item(), "pos", st.pos.tolist(), st_ref.pos.tolist())
kc = torch.randn(4, 2, 512, 64, device=dev, dtype=torch.bfloat16); vc = torch.randn_like(kc)
qq = torch.randn(4, 8, 64, device=dev, dtype=torch.bfloat16); lens = torch.tensor([1, 100, 511, 512], device=dev, dtype=torch.int32)
r = decode_attention_naive(qq.float(), kc.float(), vc.float(), lens)
o = decode_attention_split_kv(qq, kc, vc, lens)
print("decode attention rel err", ((o.float() - r).norm() / r.norm()).item())
