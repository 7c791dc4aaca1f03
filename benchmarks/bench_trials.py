"""Trials per minute at the `assembled` fidelity on this CPU, against one teacher forward.

One Workspace (SmolLM2-135M, default space, CPU budgets but `--eval-tokens` held-out tokens of
teacher text and as many of real text); the block library is built for every plan first (not
timed). For each plan it times `score(ws, plan, "assembled")` (reuses the teacher's hidden states
up to the first changed layer) and, for comparison, the same quality from full forwards. The
reference is one teacher forward (logits only) over the same held-out blocks.

    python benchmarks/bench_trials.py --out /tmp/bench_trials
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

from lbsearch.objective import score
from lbsearch.plan import Plan
from lbsearch.sensitivity import SensitivityTable, threshold_plan
from lbsearch.space import load_space
from lbsearch.workspace import Workspace

TABLE = Path(__file__).parent / "results" / "smollm2-135m_sensitivity.json"


def plans(space, n_layers: int, n: int, seed: int = 0) -> list[Plan]:
    table = SensitivityTable.load(TABLE)
    out = [threshold_plan(table, 10, 10, space.default_lswa(), (0, 1))]
    rng = random.Random(seed)
    while len(out) < n:
        plan = Plan(tuple(rng.choice(space.layer_specs(i)) for i in range(n_layers)))
        if not space.violations(plan):
            out.append(plan)
    return out


@torch.no_grad()
def teacher_forward_seconds(ws: Workspace, sets: list[str]) -> float:
    start = time.perf_counter()
    for name in sets:
        blocks = ws.eval_sets()[name].blocks
        for i in range(0, len(blocks), ws.defaults.eval_batch_size):
            ws.model(blocks[i:i + ws.defaults.eval_batch_size]).logits
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plans", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/bench_trials"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    space = load_space(None).on("cpu")
    space = space.model_copy(update={"budgets": type(space.budgets)(**{**space.budgets.model_dump(),
                                                                        "eval_tokens": args.eval_tokens})})
    t0 = time.perf_counter()
    ws = Workspace.open(space, device="cpu", progress=False)
    print(f"workspace: {time.perf_counter() - t0:.0f} s", flush=True)
    chosen = plans(space, ws.n_layers, args.plans)
    t0 = time.perf_counter()
    for plan in chosen:
        ws.ensure_blocks(plan)
    library_s = time.perf_counter() - t0
    ws.prefix_states()
    sets = list(ws.eval_sets())
    teacher = statistics.median(teacher_forward_seconds(ws, sets) for _ in range(3))
    teacher_main = statistics.median(teacher_forward_seconds(ws, ["heldout"]) for _ in range(3))
    rows = []
    for plan in chosen:
        t = time.perf_counter()
        result = score(ws, plan, "assembled")
        fast = time.perf_counter() - t
        t = time.perf_counter()
        with ws.student(plan):
            full = ws.evaluate()
        slow = time.perf_counter() - t
        assert abs(full["heldout"].kl - result.kl) < 1e-4 * max(1.0, result.kl)
        rows.append({"plan": str(plan), "first_changed": next(i for i, s in enumerate(plan.layers) if s.kind != "softmax"),
                     "trial_s": fast, "full_forward_trial_s": slow, "kl": result.kl})
        print(f"{fast:6.2f} s (full forwards {slow:6.2f} s)  {plan}", flush=True)
    trial = statistics.median(r["trial_s"] for r in rows)
    data = {"device": "cpu", "threads": torch.get_num_threads(), "eval_tokens": args.eval_tokens,
            "sets": {n: ws.eval_sets()[n].blocks.numel() for n in sets}, "library_seconds": library_s,
            "teacher_forward_s": teacher, "teacher_forward_heldout_only_s": teacher_main, "rows": rows,
            "median_trial_s": trial, "median_full_forward_trial_s": statistics.median(r["full_forward_trial_s"] for r in rows)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_trials.json").write_text(json.dumps(data, indent=1))
    print(f"\nheld-out sets {data['sets']} ({torch.get_num_threads()} threads)")
    print(f"teacher forward over the same blocks   {teacher:7.2f} s")
    print(f"assembled trial (median of {len(rows)})     {trial:7.2f} s   = {trial / teacher:.2f}x the teacher forward, "
          f"{60 / trial:.1f} trials/min")
    print(f"same quality from full forwards        {data['median_full_forward_trial_s']:7.2f} s")


if __name__ == "__main__":
    main()
