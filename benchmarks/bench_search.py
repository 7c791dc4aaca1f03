"""Search with and without the sensitivity prior on SmolLM2-135M (CPU, `assembled` fidelity).

One Workspace (the default space with its CPU budgets; LSWA windows from `--windows`, default
[64], so the block library needs one block per layer) and one LocalExecutor serve every run; the
library blocks are built first (not timed). For every seed, one study with the prior (threshold
plans enqueued first, then prior draws for the startup trials, then multi-objective TPE) and one
without (TPE alone), each until `--trials` complete trials. Recorded per run: the hypervolume after
each complete trial (against the study's fixed reference point: KL = ln(vocab), throughput ratio
1), the wall time and trials per minute. Summary: the no-prior runs' mean final hypervolume, and
how many trials each prior run needed to reach it.

    python benchmarks/bench_search.py --trials 30 --seeds 0 1 2 --out benchmarks/results/search_prior_cpu.json
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

from optuna.trial import TrialState

from lbsearch.executors.local import LocalExecutor
from lbsearch.io import atomic_write_json
from lbsearch.plan import Plan
from lbsearch.search import SearchConfig, search
from lbsearch.search.objectives import as_loss
from lbsearch.search.pareto import hypervolume
from lbsearch.search.store import load_study
from lbsearch.sensitivity import SensitivityTable
from lbsearch.space import load_space
from lbsearch.workspace import Workspace

TABLE = Path(__file__).parent / "results" / "smollm2-135m_sensitivity.json"


def curves(url: str, study_name: str, useful_kl: float) -> dict[str, list[float]]:
    """Hypervolume after each complete trial, in the order the trials finished: against the study's
    reference (``study``) and against a tighter one whose KL bound is ``useful_kl`` (``useful``)."""
    study = load_study(url, study_name)
    complete = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    order = [n for n, _ in study.user_attrs["hypervolume"] if n in complete]
    directions = [d.name.lower() for d in study.directions]
    ref = list(study.user_attrs["reference_point"])
    tight = [useful_kl if name == "kl" else r for name, r in zip(study.user_attrs["objectives"], ref)]
    out = {"study": [hv for n, hv in study.user_attrs["hypervolume"] if n in complete], "useful": []}
    for i in range(1, len(order) + 1):
        loss = as_loss([complete[n].values for n in order[:i]], directions)
        out["useful"].append(hypervolume(loss, as_loss(tight, directions)[0]))
    return out


def first_reaching(values: list[float], target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(values) if v >= target * (1 - 1e-9)), None)


def summarise(runs: list[dict], trials: int, which: str) -> dict:
    """Per arm: final hypervolumes; trials each run needed to reach the no-prior arm's mean final one."""
    arms = {arm: [r for r in runs if r["arm"] == arm] for arm in ("prior", "no_prior")}
    out = {}
    for arm, rs in arms.items():
        if rs:
            finals = [r["curves"][which][-1] for r in rs]
            out[arm] = {"seeds": [r["seed"] for r in rs], "final_hv": finals, "mean_final_hv": statistics.mean(finals),
                        "trials_per_min": statistics.mean(r["trials_per_min"] for r in rs)}
    if arms["prior"] and arms["no_prior"]:
        target = out["no_prior"]["mean_final_hv"]
        reach = {arm: [first_reaching(r["curves"][which], target) for r in rs] for arm, rs in arms.items()}
        out["target_hv"] = target
        out["trials_to_target"] = reach
        done = [n for n in reach["prior"] if n is not None]
        out["prior_median_trials_to_target"] = statistics.median(done) if len(done) == len(reach["prior"]) else None
        out["prior_reaches_target_in_half"] = all(n is not None and n <= trials / 2 for n in reach["prior"])
        for k in sorted({1, 5, 10, 20, trials} & set(range(1, trials + 1))):
            out.setdefault("mean_hv_at", {})[k] = {arm: statistics.mean(r["curves"][which][k - 1] for r in rs)
                                                  for arm, rs in arms.items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", help="search-space YAML (default: the packaged SmolLM2-135M space)")
    p.add_argument("--trials", type=int, default=30, help="complete trials per study")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--windows", type=int, nargs="+", default=[64], help="LSWA windows of the space")
    p.add_argument("--sampler", default="tpe")
    p.add_argument("--n-startup", type=int, help="prior / startup trials (default: the space's)")
    p.add_argument("--eval-tokens", type=int, help="held-out teacher-text tokens per score (default: the space's)")
    p.add_argument("--no-real-text", action="store_true", help="score on held-out teacher text only (no real-text "
                   "sets: the objective is the teacher-text KL anyway)")
    p.add_argument("--useful-kl", type=float, default=1.0, help="KL bound of a second, tighter hypervolume "
                   "reference (the study's is ln(vocab): any plan better than a uniform guess counts)")
    p.add_argument("--corpus", help="a local JSONL corpus instead of the space's data source")
    p.add_argument("--table", default=str(TABLE), help="sensitivity table for the prior")
    p.add_argument("--out", default="benchmarks/results/search_prior_cpu.json", help="raw JSON")
    p.add_argument("--work", default=os.environ.get("OUT", "runs/bench_search"), help="folder for the studies")
    args = p.parse_args()

    space = load_space(args.space).on_cpu()
    data = {**({"source": args.corpus} if args.corpus else {}), **({"eval_sources": []} if args.no_real_text else {})}
    startup = {"n_startup_trials": args.n_startup} if args.n_startup else {}
    space = space.model_copy(update={"lswa": space.lswa.model_copy(update={"windows": args.windows}),
                                     "data": space.data.model_copy(update=data),
                                     "search": space.search.model_copy(update=startup),
                                     "budgets": space.budgets.model_copy(update={"eval_tokens": args.eval_tokens
                                                                                  or space.budgets.eval_tokens})})
    table = SensitivityTable.load(args.table)
    start = time.perf_counter()
    ws = Workspace.open(space, device="cpu", progress=False)
    opened = time.perf_counter() - start
    start = time.perf_counter()
    for spec in space.kind_specs("lswa"):  # every block the searches may need, built before the clock starts
        specs = [space.layer_specs(i) for i in range(ws.n_layers)]
        ws.ensure_blocks(Plan(tuple(spec if spec in choices else choices[0] for choices in specs)))
    library_s = time.perf_counter() - start
    print(f"workspace {opened:.0f} s, block library {library_s:.0f} s", flush=True)

    work = Path(args.work)
    record = {"command": "python " + shlex.join(sys.argv),
              "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg(),
              "space": {"model": space.model, "windows": args.windows, "fidelity": space.search.fidelity,
                        "data_source": space.data.source,
                        "objectives": space.objectives, "eval_tokens": space.budgets.eval_tokens,
                        "eval_sources": space.data.eval_sources, "target": space.target.model_dump(),
                        "n_startup_trials": space.search.n_startup_trials,
                        "threshold_budgets": space.search.threshold_budgets},
              "workspace_s": opened, "library_s": library_s, "runs": []}
    executor = LocalExecutor(ws)
    for seed in args.seeds:
        for arm in ("prior", "no_prior"):
            settings = space.search.model_copy(update={"trials": args.trials, "seed": seed, "rescore_top": 0,
                                                       "sampler": args.sampler})
            run_dir = work / f"{arm}-seed{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "optuna.db").unlink(missing_ok=True)
            config = SearchConfig(space=space.model_copy(update={"search": settings}), run_dir=run_dir,
                                  table=table if arm == "prior" else None, prior=arm == "prior", progress=False)
            t0 = time.perf_counter()
            report = search(config, executor)
            wall = time.perf_counter() - t0
            hv = curves(f"sqlite:///{run_dir.resolve() / 'optuna.db'}", report.study, args.useful_kl)
            best = min(report.front.points, key=lambda q: q.values[0])
            run = {"arm": arm, "seed": seed, "wall_s": wall, "counts": report.counts, "curves": hv,
                   "trials_per_min": 60 * len(hv["study"]) / wall, "front_size": len(report.front.points),
                   "front": [[q.plan, *q.values] for q in report.front.points], "best_kl_plan": best.plan}
            record["runs"].append(run)
            print(f"{arm:8} seed {seed}: {len(hv['study'])} trials in {wall:.0f} s ({run['trials_per_min']:.1f}/min), "
                  f"final hypervolume {hv['study'][-1]:.4f} (KL <= {args.useful_kl}: {hv['useful'][-1]:.4f}), "
                  f"front {run['front_size']}, {report.counts}", flush=True)
            record["summary"] = {which: summarise(record["runs"], args.trials, which) for which in ("study", "useful")}
            record["load_average_end"] = os.getloadavg()
            atomic_write_json(args.out, record)

    print(f"\nwrote {args.out}")
    print(f"{'reference':>18} {'arm':9} {'seeds':>5} {'final HV (mean)':>15} {'trials/min':>10}  "
          f"trials to reach the no-prior mean (of {args.trials})")
    for which, label in (("study", "study's (KL ln V)"), ("useful", f"KL {args.useful_kl}")):
        s = record["summary"][which]
        for arm in ("prior", "no_prior"):
            if arm in s:
                reach = s.get("trials_to_target", {}).get(arm, [])
                print(f"{label:>18} {arm:9} {len(s[arm]['seeds']):>5} {s[arm]['mean_final_hv']:>15.4f} "
                      f"{s[arm]['trials_per_min']:>10.2f}  {reach}")


if __name__ == "__main__":
    main()
