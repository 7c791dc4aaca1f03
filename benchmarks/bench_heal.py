"""Heal SmolLM2-135M: threshold plan, remove-only and uniform lswa with one budget, side by side.

GPU:  python benchmarks/bench_heal.py --model /tmp/smol.gguf --tokens 10000000
CPU:  python benchmarks/bench_heal.py --device cpu --corpus space --tokens 16384 --plans threshold
Plans: threshold = the paper's heuristic on the measured sensitivity table (10 none, 10 lswa,
layers 0-1 pinned softmax); remove = the same 10 layers removed, the rest softmax; uniform = every
layer lswa but 0 and 1. Prints a short table last; full reports go to $OUT/bench_heal.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from lbsearch.data import blocks_hash, pack_blocks, sample_teacher_texts
from lbsearch.distill import BlockLibrary, HealConfig, TransferConfig, heal_plan
from lbsearch.evaluate import teacher_logits
from lbsearch.models import load_teacher, load_tokenizer
from lbsearch.plan import LayerSpec, Plan
from lbsearch.sensitivity import SensitivityTable, threshold_plan

TABLE = Path(__file__).parent / "results" / "smollm2-135m_sensitivity.json"


def make_plans(table: SensitivityTable) -> dict[str, Plan]:
    thr = threshold_plan(table, n_none=10, n_lswa=10, pinned=(0, 1))
    remove = Plan(tuple(s if s.kind == "none" else LayerSpec(kind="softmax") for s in thr.layers))
    uniform = Plan.uniform(table.n_layers, table.specs["lswa"]).with_layer(0, LayerSpec(kind="softmax"))
    return {"threshold": thr, "remove": remove, "uniform": uniform.with_layer(1, LayerSpec(kind="softmax"))}


def corpus_blocks(args, model, tok) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    if args.corpus == "space":  # the cached default corpus (CPU runs)
        from lbsearch.data import load_corpus
        from lbsearch.space import load_space

        space = load_space()
        texts = list(load_corpus(space.data, model, tok)["text"])
    else:
        texts = sample_teacher_texts(model, tok, args.corpus_tokens, seed=0, max_new_tokens=256,
                                     batch_size=args.gen_batch)
    return pack_blocks(texts, tok, args.seq_len), time.perf_counter() - start


def gap_closed(report: dict) -> float:
    t, b, a = (math.log(report[k]["perplexity"]) for k in ("teacher", "before", "after"))
    return (b - a) / (b - t) if b > t else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="alias, local dir or .gguf file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--corpus", choices=["generate", "space"], default="generate")
    p.add_argument("--corpus-tokens", type=int, default=1_500_000)
    p.add_argument("--gen-batch", type=int, default=768)
    p.add_argument("--tokens", type=int, default=10_000_000)
    p.add_argument("--plans", nargs="+", default=["threshold", "uniform", "remove"])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--heldout-blocks", type=int, default=8)
    p.add_argument("--calibration-blocks", type=int, default=32)
    p.add_argument("--transfer-steps", type=int, default=TransferConfig().steps)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--no-lora-mlp", action="store_true")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new plan after this many seconds")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/bench_heal"), help="bench_heal.json goes here")
    p.add_argument("--work", default="runs/bench_heal_work", help="block library, checkpoints, healed models")
    args = p.parse_args()
    t0 = time.perf_counter()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_teacher(args.model, device=args.device), load_tokenizer(args.model)
    blocks, gen_s = corpus_blocks(args, model, tok)
    print(f"corpus: {blocks.numel()} tokens in {gen_s:.0f} s; {time.perf_counter() - t0:.0f} s elapsed", flush=True)
    held, cal = args.heldout_blocks, args.calibration_blocks
    heldout, calibration, train = blocks[-held:], blocks[-held - cal:-held], blocks[:-held - cal]
    teacher = teacher_logits(model, heldout, use_cache=False)
    library = BlockLibrary(work / "library", model.lbsearch_key, blocks_hash(calibration),
                           TransferConfig(steps=args.transfer_steps))
    plans = make_plans(SensitivityTable.load(TABLE))
    cfg = HealConfig(tokens=args.tokens, batch_size=args.batch_size, lora_rank=args.lora_rank,
                     lora_mlp=not args.no_lora_mlp, checkpoint_tokens=max(args.tokens // 2, 1))
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "corpus_tokens": blocks.numel(), "train_tokens": train.numel(), "generate_seconds": gen_s,
               "heldout_tokens": heldout.numel(), "config": vars(args), "plans": {}}
    for name in args.plans:
        if time.perf_counter() - t0 > args.budget_s:
            print(f"skipping {name}: time budget", flush=True)
            continue
        fresh = load_teacher(args.model, device=args.device)
        report = heal_plan(fresh, plans[name], library, calibration, train, heldout, teacher, cfg, work / name,
                           resume=False)
        report["gap_closed"] = gap_closed(report)
        results["plans"][name] = report
        (out / "bench_heal.json").write_text(json.dumps(results, indent=1))
        print(f"{name}: ppl {report['before']['perplexity']:.2f} -> {report['after']['perplexity']:.2f} "
              f"({report['tokens_per_s']:.0f} tok/s)", flush=True)
        del fresh
    print(f"\ncorpus {blocks.numel()} tokens (generated in {gen_s:.0f} s), held-out {heldout.numel()} tokens, "
          f"budget {args.tokens} tokens, device {results['device']}")
    print(f"{'plan':10} {'S/L/N':>8} {'xfer err':>9} {'KL bef':>7} {'KL aft':>7} {'ppl T':>6} {'ppl bef':>8} "
          f"{'ppl aft':>8} {'gap':>5} {'tok/s':>8} {'s':>6}")
    for name, r in results["plans"].items():
        plan = Plan.parse(r["plan"])
        err = r["transfer_rel_error"]["mean"] if r["transfer_rel_error"] else float("nan")
        print(f"{name:10} {plan.count('softmax'):>2}/{plan.count('lswa'):>2}/{plan.count('none'):>2} {err:9.3f} "
              f"{r['before']['kl']:7.3f} {r['after']['kl']:7.3f} {r['teacher']['perplexity']:6.2f} "
              f"{r['before']['perplexity']:8.2f} {r['after']['perplexity']:8.2f} {r['gap_closed']:5.0%} "
              f"{r['tokens_per_s']:8.0f} {r['seconds']:6.0f}")


if __name__ == "__main__":
    main()
