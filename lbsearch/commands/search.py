"""``lbsearch search``: multi-objective search over plans (Optuna, the sensitivity prior, an executor)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LBSearchError
from .common import Command, add_common, add_search_options, check_positive, model_name, out_dir


def add_args(p: argparse.ArgumentParser) -> None:
    add_common(p, "runs/<model>: optuna.db, pareto.*, hypervolume.png")
    add_search_options(p)
    p.add_argument("--no-prior", action="store_true", help="no sensitivity prior: no threshold plans, "
                   "no prior draws, the base sampler alone")
    p.add_argument("--table", metavar="FILE", help="sensitivity.json for the prior (default: "
                   "<out>/sensitivity/sensitivity.json; computed there when missing)")
    p.add_argument("--resume", action="store_true", help="continue the study: finished trials are kept, trials "
                   "a stopped driver left running are run again")
    p.add_argument("--fidelity", help="fidelity the search ranks at: assembled (default), brief, full")
    p.add_argument("--rescore-top", type=int, metavar="N", help="re-score the N best front plans at the next "
                   "fidelity before reporting (default: the space's search.rescore_top; 0: off)")
    p.add_argument("--workers", type=int, default=1, help="plans scored at once; more than 1 runs Ray actors, each "
                   "with its own workspace (default 1: in this process)")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs per Ray actor on a CPU machine (default 1)")
    p.add_argument("--ray-address", metavar="ADDR", help="attach to a Ray cluster (or set RAY_ADDRESS); default: a "
                   "private local Ray when --workers > 1")


def with_flags(space, args):
    """The space with the flags applied to its ``search:`` section (validated: one-line errors)."""
    from ..search.sampler import SAMPLERS
    from ..space import parse_space

    if args.sampler is not None and args.sampler not in SAMPLERS:
        raise LBSearchError(f"--sampler {args.sampler}: unknown; allowed: {', '.join(SAMPLERS)}")
    for flag in ("trials", "time_budget"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise LBSearchError(f"--{flag.replace('_', '-')} must be positive, got {value:g}")
    if args.rescore_top is not None and args.rescore_top < 0:
        raise LBSearchError(f"--rescore-top must be 0 or more, got {args.rescore_top}")
    flags = {"trials": args.trials, "time_budget": args.time_budget, "sampler": args.sampler, "seed": args.seed,
             "fidelity": args.fidelity, "rescore_top": args.rescore_top}
    data = space.model_dump(mode="json")
    data["search"].update({k: v for k, v in flags.items() if v is not None})
    if args.time_budget is not None and args.trials is None:
        data["search"]["trials"] = None  # a time budget alone: no trial cap
    return parse_space(data, "flags")


def find_table(args, out: Path) -> Path | None:
    if args.table:
        if not Path(args.table).is_file():
            raise LBSearchError(f"--table {args.table}: file not found")
        return Path(args.table)
    path = out / "sensitivity" / "sensitivity.json"
    return path if path.is_file() else None


def load_table(path: Path, n_layers: int):
    from ..search.prior import check_table
    from ..sensitivity import SensitivityTable

    try:
        table = SensitivityTable.load(path)
    except (ValueError, KeyError, TypeError) as exc:
        raise LBSearchError(f"{path}: not a sensitivity table ({type(exc).__name__})") from None
    return check_table(table, n_layers, str(path))


def run(args) -> None:
    from ..models import load_config
    from ..search import SearchConfig, search
    from ..search.driver import default_study_name
    from ..search.lock import DriverLock
    from ..search.report import render, write_report
    from ..search.store import open_storage, sqlite_url
    from ..run_steps import executor as open_executor
    from ..run_steps import sensitivity_table
    from ..space import load_space
    from ..workspace import Workspace, pick_device

    check_positive(args, "workers", "cpus_per_worker")
    space = load_space(args.space)
    if args.model:
        space = space.model_copy(update={"model": args.model})
    space = with_flags(space.on(pick_device(args.device)), args)
    out = out_dir(args, Path("runs") / model_name(args))
    open_storage(args.storage or sqlite_url(out))  # a bad URL fails here, before any model is loaded
    DriverLock(out / ".driver.lock").check()
    n_layers = load_config(space.model).num_hidden_layers
    path = None if args.no_prior else find_table(args, out)
    table = load_table(path, n_layers) if path else None
    ws = Workspace.open(space, device=args.device)
    if table is None and not args.no_prior:
        table = sensitivity_table(ws, out / "sensitivity")
    with open_executor(ws, args.workers, args.cpus_per_worker, args.ray_address, args.device) as executor:
        config = SearchConfig(space=space, run_dir=out, storage=args.storage,
                              study_name=args.study or default_study_name(space), table=table,
                              prior=not args.no_prior, resume=args.resume)
        report = search(config, executor)
    print(render(report.front))
    counts = ", ".join(f"{v} {k}" for k, v in sorted(report.counts.items())) or "nothing new"
    print(f"study {report.study} in {report.storage}: {counts} in {report.seconds:.0f} s")
    for kind, p in write_report(report.front, out, report.storage).items():
        print(f"wrote {kind}: {p}")


COMMAND = Command(name="search", help="multi-objective search over plans (Optuna with the sensitivity prior); "
                  "writes the study and its Pareto front", add_args=add_args, run=run)
