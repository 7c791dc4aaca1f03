"""Measured serving throughput of a run's Pareto front against the speed the search predicted.

The search ranks plans by the cost model's predicted decode-throughput ratio at the space's target
(H200 tables shipped with the package). This takes a run's ``pareto.json`` (e.g. from a CPU run),
builds the teacher's shape with random weights in bf16 on the GPU (throughput does not depend on
the weights) and measures every front plan and the base with the decode engine at the target's
batch, prompt and output length, side by side in one process.

    python benchmarks/bench_front.py --pareto benchmarks/results/default_cpu_run_pareto.json --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from lbsearch.bench import sweep
from lbsearch.plan import Plan
from lbsearch.profile import random_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pareto", required=True, help="pareto.json of a run")
    ap.add_argument("--shape", default="smollm2-135m", help="lbsearch.profile.SHAPES name of the teacher")
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--output", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/bench_front"))
    args = ap.parse_args()
    front = json.loads(Path(args.pareto).read_text())["front"]
    model = random_model(args.shape, torch.bfloat16, "cuda")
    plans = [Plan.parse(p["plan"]) for p in front]
    rows, _ = sweep(model, plans, [args.batch], args.prompt, args.output, repeats=args.repeats, measure_costs=False)
    measured = {r["plan"]: r for r in rows}
    table = []
    for p, plan in zip(front, plans):
        row = measured[str(plan)]
        table.append({"trial": p["trial"], "plan": str(plan), "predicted": p["throughput_ratio"],
                      "measured": row["speedup"], "decode_tps": row["decode_tps"],
                      "error": row["speedup"] / p["throughput_ratio"] - 1})
    base = next(r for r in rows if r["is_base"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/bench_front.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "base_decode_tps": base["decode_tps"],
              "rows": table, "engine_rows": rows}
    (out / "bench_front.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"base: {base['decode_tps']:,.0f} decode tok/s at batch {args.batch}, prompt {args.prompt}, "
          f"output {args.output}")
    print(f"{'trial':>5} {'predicted':>9} {'measured':>9} {'error':>7}  plan")
    for r in table:
        print(f"{r['trial']:>5} {r['predicted']:9.3f} {r['measured']:9.3f} {r['error']:+7.1%}  {r['plan']}")


if __name__ == "__main__":
    main()
