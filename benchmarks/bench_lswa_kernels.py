"""Benchmark the LSWA Triton kernels on one GPU.

Prefill (forward, forward+backward) at B=8, H=32 (8 kv heads), D=64, F=64, window 64, sinks 4,
bf16, T in 2k/8k/32k: ours vs (a) the PyTorch reference where it fits, (b) the same structure
composed from flash-linear-attention's chunked linear attention plus a sliding-window+sinks
flex_attention (only if ``fla`` imports), (c) full causal SDPA. Decode step at batch 1/64/256
(position 4096): achieved bytes/s against the measured device-to-device copy bandwidth.
Also the compiled kernels' registers / spills / shared memory. Prints a table last and writes
JSON to ``$OUT/lswa_kernels.json`` when ``$OUT`` is set.

    python benchmarks/bench_lswa_kernels.py [--seqlens 2048 8192 32768] [--budget-s 240]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as tF
from triton.testing import do_bench, do_bench_cudagraph

from lbsearch.kernels.lswa import chunk, fused_recurrent
from lbsearch.kernels.lswa.naive import LSWAState, lswa_naive, lswa_state_from_prefill

B, H, HKV, D, F, W, S = 8, 32, 8, 64, 64, 64, 4
DT = torch.bfloat16


def inputs(b, t, grad=False):
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", dtype=DT, generator=g)  # noqa: E731
    f = lambda *s: torch.rand(*s, device="cuda", dtype=DT, generator=g)  # noqa: E731
    xs = [r(b, t, H, D), r(b, t, HKV, D), r(b, t, HKV, D), f(b, t, H, F), f(b, t, HKV, F),
          torch.full((H,), 0.7, device="cuda")]
    return [x.requires_grad_(grad) for x in xs]


def timed(fn, xs=None):
    """Median milliseconds (triton.testing.do_bench, after its warm-up)."""
    return do_bench(fn, warmup=10, rep=50, grad_to_none=xs, return_mode="median")


def fwd_bwd(fn, xs):
    do = torch.randn_like(xs[0])

    def run():
        fn(*xs).backward(do)
    return run


def ours(q, k, v, fq, fk, gate):
    return chunk.lswa_chunk(q, k, v, fq, fk, gate, W, S)


def reference(q, k, v, fq, fk, gate):
    return lswa_naive(q, k, v, fq, fk, gate, W, S)


def sdpa(q, k, v, fq, fk, gate):
    o = tF.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        is_causal=True, enable_gqa=True)
    return o.transpose(1, 2)


def make_composed():
    """(b): fla chunk linear attention over keys shifted by the window, plus flex attention over
    window + sinks returning its log-sum-exp. Same work as LSWA; it normalises the softmax part
    by exp(lse) instead of exp(max), so it is a cost proxy, not the identical function."""
    from fla.ops.linear_attn import chunk_linear_attn
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention)
    masks = {}

    def composed(q, k, v, fq, fk, gate):
        t, grp = q.shape[1], H // HKV
        if t not in masks:
            masks[t] = create_block_mask(lambda b, h, i, j: (j <= i) & ((i - j < W) | (j < S)),
                                         None, None, t, t)
        o_w, lse = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                        block_mask=masks[t], enable_gqa=True, return_lse=True)
        shift = lambda x: tF.pad(x[:, S:t - W], (0, 0, 0, 0, W + S, 0))  # noqa: E731
        fk_s = shift(fk).repeat_interleave(grp, 2)
        v_s = shift(v).repeat_interleave(grp, 2)
        num, _ = chunk_linear_attn(fq, fk_s, v_s, scale=1.0, normalize=False)
        den = (fq.float() * fk_s.float().cumsum(1)).sum(-1, keepdim=True)
        g = gate.view(1, 1, H, 1)
        return ((g * o_w.transpose(1, 2) + (1 - g) * num) / (g + (1 - g) * den)).to(q.dtype)
    return composed


def prefill_rows(seqlens, budget_s, t0):
    try:
        composed = make_composed()
        composed_note = "fla chunk_linear_attn + compiled flex_attention (lse-normalised proxy)"
    except Exception as e:  # noqa: BLE001
        composed, composed_note = None, f"skipped: fla not importable ({type(e).__name__}: {e})"
        print(f"(b) skipped: {composed_note}")
    rows = []
    for t in seqlens:
        impls = {"ours": ours, "sdpa_full_causal": sdpa, "composed_fla_flex": composed}
        # the reference holds ~6 [B,H,T,T] bf16 tensors at once
        impls["torch_reference"] = reference if 6 * B * H * t * t * 2 < 100e9 else None
        for name, fn in impls.items():
            for mode in ("fwd", "fwd_bwd"):
                row = dict(T=t, impl=name, mode=mode)
                if fn is None or (name != "ours" and time.time() - t0 > budget_s):
                    row["ms"] = None
                    row["note"] = "skipped" + ("" if fn is None else " (time budget)")
                else:
                    try:
                        xs = inputs(B, t, grad=mode == "fwd_bwd")
                        run = (lambda: fn(*xs)) if mode == "fwd" else fwd_bwd(fn, xs)
                        row["ms"] = timed(run, xs if mode == "fwd_bwd" else None)
                    except torch.OutOfMemoryError:
                        row["ms"], row["note"] = None, "out of memory"
                    except Exception as e:  # noqa: BLE001
                        row["ms"], row["note"] = None, f"{type(e).__name__}: {str(e)[:200]}"
                    finally:
                        xs = run = None
                        torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows, composed_note


def copy_bandwidth():
    """Device-to-device copy: bytes read + written per second."""
    x = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x))
    return 2 * x.numel() / (ms * 1e-3)


def decode_bytes(b: int, st: LSWAState) -> int:
    """Bytes the fused step reads and writes: inputs, output, sinks + ring k/v read, the linear
    state read and written, one ring_fk row read, one ring row written, pos read and written."""
    e = st.ring_k.element_size()
    io = b * (2 * H * D + H * F + 2 * HKV * D + HKV * F) * 2 + H * 4  # q, o, fq, k, v, fk, gate
    ring = 2 * st.ring_k.numel() * e + 2 * st.sink_k.numel() * e      # full reads
    lin = 2 * (st.lin_s.numel() + st.lin_z.numel()) * 4               # read + write
    rows = b * HKV * (F + 2 * D + F) * e                               # leaving fk row, new rows
    return io + ring + lin + rows + 2 * b * 8


def decode_rows(copy_bw, pos=4096):
    """Per batch: eager time (do_bench, includes Python launch cost) and CUDA-graph time (GPU
    only, as a serving loop runs it) for num_warps 2/4/8; bandwidth from the best graph time."""
    rows = []
    for b in (1, 64, 256):
        g = torch.Generator(device="cuda").manual_seed(1)
        pre = [torch.randn(b, pos, HKV, D, device="cuda", dtype=DT, generator=g) for _ in range(2)]
        fk0 = torch.rand(b, pos, HKV, F, device="cuda", dtype=DT, generator=g)
        st = lswa_state_from_prefill(pre[0], pre[1], fk0, W, S)
        del pre, fk0
        q = torch.randn(b, H, D, device="cuda", dtype=DT)
        k, v = (torch.randn(b, HKV, D, device="cuda", dtype=DT) for _ in range(2))
        fq, fk = torch.rand(b, H, F, device="cuda", dtype=DT), torch.rand(b, HKV, F, device="cuda",
                                                                         dtype=DT)
        gate = torch.full((H,), 0.7, device="cuda")
        nbytes = decode_bytes(b, st)
        row = dict(batch=b, pos=pos, bytes=nbytes)
        for nw in (2, 4, 8):
            step = lambda: fused_recurrent.lswa_decode_fused(q, k, v, fq, fk, gate, st,  # noqa: E731
                                                             num_warps=nw)
            step()
            row[f"eager_us_w{nw}"] = timed(step) * 1e3
            row[f"graph_us_w{nw}"] = do_bench_cudagraph(step, rep=50, return_mode="median") * 1e3
        best = min((2, 4, 8), key=lambda nw: row[f"graph_us_w{nw}"])
        row.update(best_warps=best, us=row[f"graph_us_w{best}"])
        row["GBps"] = nbytes / (row["us"] * 1e-6) / 1e9
        row["frac_of_copy"] = row["GBps"] * 1e9 / copy_bw
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bwd_warps_check(t=32768):
    """ours fwd+bwd with 4 vs 8 warps in the backward kernels."""
    out, default = {}, chunk.BWD_WARPS
    for nw in (4, 8):
        chunk.BWD_WARPS = nw
        xs = inputs(B, t, grad=True)
        out[nw] = timed(fwd_bwd(ours, xs), xs)
    chunk.BWD_WARPS = default
    print(json.dumps({"bwd_warps_fwd_bwd_ms": out, "T": t}), flush=True)
    return out


def kernel_stats():
    """n_regs / n_spills / shared bytes of every compiled specialisation of our kernels."""
    fns = {n: getattr(chunk, n) for n in ("_prefix_kernel", "_fwd_kernel", "_bwd_dq_kernel",
                                          "_bwd_state_kernel", "_bwd_sink_kernel",
                                          "_bwd_dkv_kernel")}
    fns["_decode_kernel"] = fused_recurrent._decode_kernel
    out = []
    for name, fn in fns.items():
        for dev_cache in getattr(fn, "device_caches", {}).values():
            for ck in dev_cache[0].values():
                ck._init_handles()
                out.append(dict(kernel=name, n_regs=ck.n_regs, n_spills=ck.n_spills,
                                shared=ck.metadata.shared, num_warps=ck.metadata.num_warps))
    return out


def table(prefill, decode, stats, copy_bw):
    lines = ["", "prefill (ms, median)   B=8 H=32 Hkv=8 D=64 F=64 W=64 S=4 bf16",
             f"{'T':>6} {'mode':>8} " + " ".join(f"{n:>18}" for n in
                                                 ("ours", "torch_reference", "composed_fla_flex",
                                                  "sdpa_full_causal"))]
    for t in sorted({r["T"] for r in prefill}):
        for mode in ("fwd", "fwd_bwd"):
            cell = {r["impl"]: r["ms"] for r in prefill if r["T"] == t and r["mode"] == mode}
            lines.append(f"{t:>6} {mode:>8} " + " ".join(
                f"{cell.get(n) or float('nan'):>18.3f}" for n in
                ("ours", "torch_reference", "composed_fla_flex", "sdpa_full_causal")))
    lines += ["", f"decode step, CUDA graph (copy bandwidth {copy_bw / 1e9:.0f} GB/s)",
              f"{'batch':>6} {'warps':>5} {'us':>9} {'eager us':>9} {'GB/s':>9} {'of copy':>8}"]
    lines += [f"{r['batch']:>6} {r['best_warps']:>5} {r['us']:>9.2f} "
              f"{r['eager_us_w' + str(r['best_warps'])]:>9.2f} {r['GBps']:>9.0f} "
              f"{r['frac_of_copy']:>8.1%}" for r in decode]
    lines += ["", f"{'kernel':>18} {'regs':>5} {'spills':>6} {'smem':>7} {'warps':>5}"]
    lines += [f"{s['kernel']:>18} {s['n_regs']:>5} {s['n_spills']:>6} {s['shared']:>7} "
              f"{s['num_warps']:>5}" for s in stats]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[2048, 4096, 8192, 32768])
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="skip remaining baselines after this many seconds")
    args = ap.parse_args()
    t0 = time.time()
    copy_bw = copy_bandwidth()
    decode = decode_rows(copy_bw)
    bwd_warps = bwd_warps_check()
    prefill, note = prefill_rows(args.seqlens, args.budget_s, t0)
    stats = kernel_stats()
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=__import__("triton").__version__, copy_GBps=copy_bw / 1e9,
                  shape=dict(B=B, H=H, HKV=HKV, D=D, F=F, window=W, sinks=S, dtype=str(DT)),
                  composed=note, bwd_warps_fwd_bwd_ms=bwd_warps, prefill=prefill, decode=decode, kernels=stats)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "lswa_kernels.json"), "w") as fh:
            json.dump(result, fh, indent=1)
    print(table(prefill, decode, stats, copy_bw))


if __name__ == "__main__":
    main()
