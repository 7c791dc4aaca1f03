"""Where a sampled decode step's time goes at a GPU-sized batch (default teacher or its shape).

Times (CUDA events, median of replays) one captured engine step, greedy and sampled with
``lbsearch.data.SAMPLING``, in float32, float32 with TF32 matmuls, and bfloat16; and the sampling
pieces alone on logits [batch, vocab]: full sort (top-p), top-k 1024, softmax, the exponential race.

    python benchmarks/profile_sample_step.py --model smollm2-135m --batch 512 --out $OUT
    python benchmarks/profile_sample_step.py --kernels     # torch.profiler: CUDA kernels of 5 eager sampled steps
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def med(fn, n=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[n // 2]


def kernels(batch: int) -> None:
    """CUDA kernels of 5 eager sampled steps (random SmolLM2-135M weights, context 150), float32 and bfloat16."""
    from torch.profiler import ProfilerActivity, profile

    from lbsearch.engine import DecodeEngine
    from lbsearch.profile import fake_fill, random_model
    from lbsearch.sampling import Sampling

    for dt in (torch.float32, torch.bfloat16):
        m = random_model("smollm2-135m", dt, "cuda").eval()
        e = DecodeEngine(m, batch, 300, graph=False)
        e.configure(Sampling(0.8, 0, 0.95), eos_token_id=[2])
        fake_fill(e, 150)
        for _ in range(3):
            e._step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                e._step()
            torch.cuda.synchronize()
        print(dt)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))
        del e, m


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--context", type=int, default=150)
    p.add_argument("--out", default="runs/profile_sample_step")
    p.add_argument("--kernels", action="store_true", help="only the per-kernel profile (see kernels())")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    if args.kernels:
        return kernels(args.batch)
    from lbsearch import load_teacher
    from lbsearch.data import SAMPLING
    from lbsearch.engine import DecodeEngine
    from lbsearch.profile import SHAPES, fake_fill, random_model
    from lbsearch.sampling import Sampling, _race, filter_logits

    rows = []
    s = Sampling(SAMPLING["temperature"], 0, SAMPLING["top_p"])
    for variant in ("float32", "float32+tf32", "bfloat16"):
        torch.backends.cuda.matmul.allow_tf32 = variant.endswith("tf32")
        dtype = torch.bfloat16 if variant == "bfloat16" else torch.float32
        if args.model in SHAPES:  # random weights of that shape (the step's speed depends on shapes only)
            model = random_model(args.model, dtype, "cuda").eval().requires_grad_(False)
        else:
            model = load_teacher(args.model, dtype=dtype, device="cuda")
        eng = DecodeEngine(model, args.batch, args.context + 64)
        for name, setting in (("greedy", Sampling()), ("sampled", s)):
            eng.configure(setting, eos_token_id=[2], seed=0)
            fake_fill(eng, args.context)
            g = eng._graphs[(setting, True)]
            ms = med(g.replay)
            rows.append({"variant": variant, "step": name, "ms": ms})
            print(f"{variant:14s} {name:8s} step {ms:7.3f} ms", flush=True)
        del eng, model
        torch.cuda.empty_cache()
    torch.backends.cuda.matmul.allow_tf32 = False
    logits = torch.randn(args.batch, 49152, device="cuda") * 3
    gen = torch.Generator(device="cuda").manual_seed(0)
    probs = logits.softmax(-1)
    pieces = {"sort": lambda: logits.sort(dim=-1), "topk1024": lambda: logits.topk(1024, dim=-1),
              "softmax": lambda: logits.softmax(-1), "filter_logits(top_p)": lambda: filter_logits(logits, s),
              "race": lambda: _race(probs, gen), "argmax": lambda: logits.argmax(-1)}
    for name, fn in pieces.items():
        ms = med(fn)
        rows.append({"variant": "logits fp32", "step": name, "ms": ms})
        print(f"piece {name:22s} {ms:7.3f} ms", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps({"meta": {"model": args.model, "batch": args.batch,
        "context": args.context, "gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")},
        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
