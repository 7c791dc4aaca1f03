"""Trials per minute at the `assembled` fidelity: LocalExecutor against RayExecutor with 1 and 2 workers.

The same random feasible plans (seeded) go to every executor, all submitted at once. This
process opens one Workspace first (warms the teacher copy, corpus and logits caches) and, unless
`--cold`, trains the library blocks of every plan, so each executor is timed at steady state;
that preparation is timed apart. Every Ray run starts (and shuts down) its own local Ray, so
its start-up (ray.init plus every worker opening its Workspace) is measured too.

    python benchmarks/bench_executors.py --space tiny --trials 60 --out benchmarks/results/executors_tiny.json
    python benchmarks/bench_executors.py --space default --trials 12 --runs ray:1x2 ray:2x1 \\
        --out benchmarks/results/executors_cpu.json

`--runs`: `local` and/or `ray:WORKERSxCPUS` (workers x CPUs per worker).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from lbsearch.executors.base import Job, WorkspaceSpec
from lbsearch.executors.local import LocalExecutor
from lbsearch.plan import Plan
from lbsearch.space import load_space
from lbsearch.workspace import Workspace


def tiny_space(root: Path) -> Path:
    """The tests' tiny space (a random 4-layer llama and a local corpus) in ``root``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import write_tiny_space

    from lbsearch.models import load_tokenizer

    return write_tiny_space(root, load_tokenizer("smollm2-135m"))


def random_plans(space, n_layers: int, n: int, seed: int = 0) -> list[Plan]:
    """``n`` distinct feasible plans drawn uniformly from the space's choices."""
    rng, out, tries = random.Random(seed), {}, 0
    while len(out) < n and tries < 100 * n:
        tries += 1
        plan = Plan(tuple(rng.choice(space.layer_specs(i)) for i in range(n_layers)))
        if not space.violations(plan):
            out.setdefault(plan.key, plan)
    return list(out.values())


def run_jobs(executor, plans: list[Plan]) -> tuple[float, list]:
    start = time.perf_counter()
    for i, plan in enumerate(plans):
        executor.submit(Job(id=i, plan=str(plan)))
    outcomes = []
    while executor.pending():
        outcomes += executor.wait(timeout=10.0)
    return time.perf_counter() - start, outcomes


def measure(kind: str, ws, spec: WorkspaceSpec, plans: list[Plan]) -> dict:
    if kind == "local":
        start = time.perf_counter()
        executor, workers, cpus = LocalExecutor(ws), 1, os.cpu_count()
        startup = time.perf_counter() - start
    else:
        from lbsearch.executors.ray import RayExecutor

        workers, cpus = (int(x) for x in kind.split(":")[1].split("x"))
        start = time.perf_counter()
        executor = RayExecutor(spec, workers=workers, cpus_per_worker=cpus)
        startup = time.perf_counter() - start
    with executor:
        elapsed, outcomes = run_jobs(executor, plans)
    seconds = [o.details.get("seconds", 0.0) for o in outcomes if o.result]
    row = {"executor": kind, "workers": workers, "cpus_per_worker": cpus, "startup_s": startup,
           "elapsed_s": elapsed, "trials": len(outcomes), "errors": [o.error for o in outcomes if o.error],
           "trials_per_min": 60 * len(outcomes) / elapsed, "median_trial_s": statistics.median(seconds) if seconds else None,
           "per_worker": dict(Counter(o.worker for o in outcomes)),
           "trial_s": {o.result.plan: o.details.get("seconds") for o in outcomes if o.result}}
    print(f"{kind:8s} start-up {startup:6.1f} s  {len(outcomes)} trials in {elapsed:6.1f} s  "
          f"{row['trials_per_min']:6.1f} trials/min", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", default="tiny", help="tiny, default, or a space YAML")
    p.add_argument("--trials", type=int, default=60)
    p.add_argument("--runs", nargs="+", default=["local", "ray:1x2", "ray:2x1"])
    p.add_argument("--cold", action="store_true", help="do not train the plans' library blocks first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory()
    source = {"tiny": lambda: tiny_space(Path(tmp.name)), "default": lambda: None}.get(args.space, lambda: args.space)()
    cache = None
    if args.space == "tiny":
        cache = str(Path(tmp.name) / "cache")
    space = load_space(source).on("cpu")
    start = time.perf_counter()
    ws = Workspace.open(space, device="cpu", cache=cache, progress=False)
    open_s = time.perf_counter() - start
    plans = random_plans(space, ws.n_layers, args.trials, args.seed)
    start = time.perf_counter()
    built = 0 if args.cold else sum(len(ws.ensure_blocks(plan)) for plan in plans)
    library_s = time.perf_counter() - start
    spec = WorkspaceSpec(space=space.model_dump(), device="cpu", cache=os.environ.get("LBSEARCH_CACHE"))
    print(f"workspace {open_s:.1f} s; {len(plans)} plans; {built} library blocks trained in {library_s:.1f} s", flush=True)
    rows = [measure(kind, ws, spec, plans) for kind in args.runs]
    data = {"space": args.space, "model": space.model, "trials": len(plans), "cold": args.cold,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_end": os.getloadavg()},
            "workspace_open_s": open_s, "library_blocks_trained": built, "library_s": library_s, "runs": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"\n{args.space} space, {len(plans)} assembled trials, {os.cpu_count()} CPUs (load {os.getloadavg()[0]:.1f})")
    print(f"{'executor':10s} {'workers':>7s} {'start-up s':>10s} {'trials/min':>10s} {'median trial s':>14s}")
    for r in rows:
        print(f"{r['executor']:10s} {r['workers']:>4d}x{r['cpus_per_worker']:<2d} {r['startup_s']:10.1f} "
              f"{r['trials_per_min']:10.1f} {r['median_trial_s'] or 0:14.2f}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
