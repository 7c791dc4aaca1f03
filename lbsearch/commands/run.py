"""``lbsearch run``: the whole pipeline (sensitivity, block library, search, finalists, report, export)."""
from __future__ import annotations

import argparse

from .common import Command, add_search_options

BUDGET_FLAGS = ("calibration_tokens", "healing_tokens", "trial_healing_tokens", "eval_tokens", "sensitivity_tokens")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML with any of the settings below (names with _ instead "
                   "of -, budgets under budgets:); flags override it")
    p.add_argument("--space", metavar="FILE", help="search-space YAML (default: the packaged smollm2-135m space; "
                   "without a GPU its cpu: section sizes the run for a CPU)")
    p.add_argument("--model", metavar="REF", help="override the space's model: registry alias, local HF dir, "
                   ".gguf file or hub id")
    p.add_argument("--out", metavar="DIR", help="run folder (default: runs/<model>); everything the run makes "
                   "is there, and a re-run continues it")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    add_search_options(p)
    p.add_argument("--no-prior", dest="prior", action="store_const", const=False, help="no sensitivity "
                   "analysis and no prior: the base sampler alone")
    p.add_argument("--finalists", type=int, metavar="N", help="front plans re-scored healed at the end "
                   "(default: the space's search.rescore_top; 0: none)")
    p.add_argument("--workers", type=int, help="plans scored at once; more than 1 runs Ray actors (default 1: "
                   "in this process)")
    p.add_argument("--cpus-per-worker", type=int, help="CPUs per Ray actor on a CPU machine (default 1)")
    p.add_argument("--ray-address", metavar="ADDR", help="attach to a Ray cluster (or set RAY_ADDRESS); "
                   "default: a private local Ray when --workers > 1")
    p.add_argument("--mlflow-uri", metavar="URI", help="MLflow tracking server http://HOST:PORT or sqlite:///ABS.db "
                   "(default: mlflow.db in the run folder)")
    p.add_argument("--experiment", help="MLflow experiment name (default: lbsearch)")
    p.add_argument("--resume", action="store_const", const=True, help="continue the run in --out with the "
                   "settings it was started with (flags given now override them)")
    for name in BUDGET_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, metavar="N",
                       help=f"override the space's budgets.{name}")


def config_of(args):
    from ..run_config import load_run_config

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "func", "argv", "config", *BUDGET_FLAGS)}
    flags["budgets"] = {k: getattr(args, k) for k in BUDGET_FLAGS if getattr(args, k) is not None}
    return load_run_config(args.config, flags)


def run(args) -> None:
    from ..pipeline import run as run_pipeline
    from ..search.report import render
    from ..tracking import UI_HINT, ui_command

    report = run_pipeline(config_of(args))
    print()
    print(render(report.front))
    out = report.run_dir
    ui = ui_command(out) if report.tracking_uri.startswith("sqlite") else f"open {report.tracking_uri}"
    print(f"\nrun folder: {out} (pareto.json, pareto.csv, pareto.png, front.html, hypervolume.png)")
    print(f"study: {report.front.study} in {report.storage}")
    print(f"MLflow: {ui}\n  {UI_HINT}")
    print(f"exported plans: {report.outputs['export']}")
    healed = [p for p in report.front.points if (out / "finalists" / p.key / "healed").is_dir()]
    if healed:
        print(f"a deployable healed model: lbsearch export {out} --plan {healed[0].trial}  "
              f"(finalists: {', '.join(str(p.trial) for p in healed)})")


COMMAND = Command(name="run", help="the whole pipeline: sensitivity, block library, multi-objective search, "
                  "finalists healed, Pareto report, MLflow tracking, export", add_args=add_args, run=run)
