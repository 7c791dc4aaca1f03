"""Where a healing step's time goes, and what each speed-up buys (SmolLM2-135M shape, random weights).

GPU:  python benchmarks/bench_heal_step.py            (CPU: --device cpu --batch-size 2 --seq-len 128)
Times one optimizer step of lbsearch.distill.healing for several step variants side by side on the
threshold plan, plus a torch.profiler table of the slowest kernels of the first variant. Weights
are random (timing does not depend on them), so no model file is needed. Full results go to
$OUT/bench_heal_step.json; the last thing printed is a table of tokens/s per variant.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lbsearch.distill.healing import HealConfig, HealStep, add_lora, trainable_parameters
from lbsearch.sensitivity import SensitivityTable, threshold_plan
from lbsearch.surgery import apply_plan

TABLE = Path(__file__).parent / "results" / "smollm2-135m_sensitivity.json"
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
               max_position_embeddings=8192, rms_norm_eps=1e-5)

VARIANTS = {  # name: HealConfig overrides
    "online": dict(teacher="online", lora_mlp=True),
    "cached": dict(teacher="cached", lora_mlp=True),
    "cached-attn-lora": dict(teacher="cached", lora_mlp=False),
    "cached-no-lora": dict(teacher="cached", lora_rank=0),
}


def build(device: str, cfg: HealConfig):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).to(device)
    plan = threshold_plan(SensitivityTable.load(TABLE), n_none=10, n_lswa=10, pinned=(0, 1))
    handle = apply_plan(model, plan)
    add_lora(model, cfg)
    return model, handle


def time_variant(device: str, cfg: HealConfig, ids: torch.Tensor, steps: int, profile: bool) -> dict:
    model, handle = build(device, cfg)
    params = trainable_parameters(model)
    step = HealStep(model, handle, cfg, params)
    teacher = step.teacher_targets(ids) if cfg.teacher == "cached" else None
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up: Triton compilation, allocator
        step.loss_and_backward(ids, teacher)
        step.optimizer_step(1.0)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step.loss_and_backward(ids, teacher)
        step.optimizer_step(1.0)
    sync()
    seconds = (time.perf_counter() - start) / steps
    table = None
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with prof(activities=acts) as p:
            step.loss_and_backward(ids, teacher)
            step.optimizer_step(1.0)
            sync()
        key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        table = p.key_averages().table(sort_by=key, row_limit=25)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"seconds_per_step": seconds, "tokens_per_s": ids.numel() / seconds, "peak_gib": peak,
            "profile": table}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default=os.environ.get("OUT", "runs/bench_heal_step"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(0, SMOLLM2["vocab_size"], (args.batch_size, args.seq_len), device=args.device)
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "config": vars(args), "variants": {}}
    for i, name in enumerate(args.variants):
        cfg = HealConfig(batch_size=args.batch_size, **VARIANTS[name])
        results["variants"][name] = r = time_variant(args.device, cfg, ids, args.steps, profile=i == 0)
        if r["profile"]:
            print(r["profile"])
        print(f"{name}: {r['tokens_per_s']:.0f} tok/s", flush=True)
        (out / "bench_heal_step.json").write_text(json.dumps(results, indent=1))
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    base = results["variants"][args.variants[0]]["tokens_per_s"]
    print(f"\n{args.batch_size}x{args.seq_len} tokens per step, device {results['device']}")
    print(f"{'variant':24} {'ms/step':>8} {'tok/s':>9} {'vs first':>9} {'peak GiB':>9}")
    for name, r in results["variants"].items():
        print(f"{name:24} {r['seconds_per_step'] * 1e3:8.1f} {r['tokens_per_s']:9.0f} "
              f"{r['tokens_per_s'] / base:8.2f}x {r['peak_gib']:9.1f}")


if __name__ == "__main__":
    main()
