"""``lbsearch export``: the Pareto front's plans as files, and one plan as a deployable healed model."""
from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from ..errors import LBSearchError
from ..io import writable_dir
from .common import Command, check_positive, out_dir


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR",
                   help="run folder of `lbsearch run` (its optuna.db, space.yaml, finalists/, mlflow.db)")
    p.add_argument("--space", metavar="FILE", help="search-space YAML of the run (default: RUN_DIR/space.yaml, "
                   "else the packaged default space with the study's model)")
    p.add_argument("--model", metavar="REF", help="override the space's model (the teacher the plan is applied to)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR/export)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--storage", metavar="URL", help="Optuna storage URL (default: sqlite:///RUN_DIR/optuna.db)")
    p.add_argument("--study", metavar="NAME", help="study name (default: the storage's only study)")
    p.add_argument("--plan", metavar="ID", help="export this front plan as a model: trial number, plan key or "
                   "plan string (see the ids in the printed table)")
    p.add_argument("--model-out", metavar="DIR", help="folder of the deployable model (default: "
                   "OUT/model-<plan key>); load it with lbsearch.load_model(DIR)")
    p.add_argument("--healed", metavar="DIR", help="healed folder of the plan (default: found under RUN_DIR; "
                   "else the plan is healed now)")
    p.add_argument("--heal-tokens", type=int, metavar="N", help="healing budget when the plan has no healed "
                   "folder yet (default: the space's budgets.healing_tokens for this device)")
    p.add_argument("--log-model", action="store_true", help="also log the model to the trial's MLflow run "
                   "(models-from-code pyfunc: safetensors and code, no pickle)")
    p.add_argument("--mlflow-uri", metavar="URI", help="MLflow store of the run (default: sqlite RUN_DIR/mlflow.db)")


def _sources(args) -> tuple[Path | None, str]:
    """The run folder and the Optuna storage URL, checked."""
    run = Path(args.run_dir) if args.run_dir else None
    if run is not None and not run.is_dir():
        raise LBSearchError(f"{run}: run folder not found")
    if args.storage:
        return run, args.storage
    if run is None:
        raise LBSearchError("give a RUN_DIR, or --storage URL (with --out DIR)")
    if not (run / "optuna.db").is_file():
        raise LBSearchError(f"{run}: no optuna.db (not a `lbsearch run` folder?); pass --storage URL")
    from ..search.store import sqlite_url

    return run, sqlite_url(run)


def _space(args, run: Path | None, attrs: dict):
    """--space, else RUN_DIR/space.yaml, else the packaged default space with the study's model."""
    from ..space import load_space

    path = args.space or (run / "space.yaml" if run and (run / "space.yaml").is_file() else None)
    if path:
        return load_space(path), str(path)
    space = load_space(None)
    if attrs.get("model") and attrs["model"] != space.model:
        space = space.model_copy(update={"model": attrs["model"]})
    return space, "packaged default space (no RUN_DIR/space.yaml; --space FILE names one)"


def _healed_folder(args, run: Path | None, out: Path, key: str) -> Path | None:
    from ..export import is_healed_folder

    if args.healed:
        if not is_healed_folder(args.healed):
            raise LBSearchError(f"--healed {args.healed}: not a healed folder (plan.json, heal.json, "
                                "weights.safetensors)")
        return Path(args.healed)
    places = [out / f"heal-{key}" / "healed"]
    if run is not None:
        places += [run / "finalists" / key / "healed", run / "finalists" / key]
    return next((p for p in places if is_healed_folder(p)), None)


def run(args) -> None:
    from ..export import export_model, export_plans, find_row, front_rows, log_model
    from ..plan import Plan
    from ..tracking import Tracker, storage_tag

    check_positive(args, "heal_tokens")
    run_dir, storage = _sources(args)
    if args.out is None and run_dir is None:
        raise LBSearchError("--out DIR is needed without a RUN_DIR")
    args.out = args.out or str(run_dir / "export")
    if (args.model_out or args.log_model or args.healed or args.heal_tokens) and not args.plan:
        raise LBSearchError("--model-out, --log-model, --healed and --heal-tokens need --plan ID")
    study, rows, attrs = front_rows(storage, args.study)
    if not rows:
        raise LBSearchError(f"study {study}: no feasible completed trial with a result yet; nothing to export")
    space, space_source = _space(args, run_dir, attrs)
    row = find_row(rows, args.plan) if args.plan else None
    out = out_dir(args, Path(args.out))
    plan = Plan.parse(row["plan"]) if row else None
    model_out = writable_dir(Path(args.model_out) if args.model_out else out / f"model-{plan.key}",
                          "--model-out") if row else None
    healed = _healed_folder(args, run_dir, out, plan.key) if row else None
    tracker = None
    if args.log_model:  # find the trial's run before any heavy work
        tracker = Tracker.locate(args.mlflow_uri, run_dir or out, study, storage)
        if tracker is None:
            raise LBSearchError(f"--log-model: no MLflow run of study {study} in "
                                f"{args.mlflow_uri or (run_dir or out) / 'mlflow.db'}")
    meta = {"model": args.model or space.model, "data": space.data.model_dump(), "target": space.target.model_dump(),
            "objectives": list(space.objectives), "space": space_source, "study": study, "storage": storage_tag(storage)}
    export_plans(rows, out / "plans", meta)
    print(f"study {study}: {len(rows)} plans on the front (space: {space_source})")
    print(f"{'id':>5}  {'fidelity':9} {'KL':>8} {'ppl':>8} {'thru':>6}  plan")
    for r in rows:
        res = r["result"]
        print(f"{r['trial_number']:>5}  {res['fidelity']:9} {res['kl']:8.4f} {res['perplexity']:8.3f} "
              f"{res['throughput_ratio']:6.3f}  {r['plan']}")
    print(f"wrote plans: {out / 'plans'} (YAML and JSON per plan, index.json)")
    if row is None:
        return
    if healed is None:
        print("no healed folder for this plan (--healed DIR names one; --heal-tokens N sets the budget of healing "
              "it now)", flush=True)
    export_model(plan, model_out, space=space, healed=healed, work_dir=out / f"heal-{plan.key}",
                 heal_tokens=args.heal_tokens, device=args.device, model=args.model,
                 meta={"trial_number": row["trial_number"], "study": study}, say=partial(print, flush=True))
    print(f"wrote model: {model_out} (load with lbsearch.load_model({str(model_out)!r}))")
    if tracker is not None:
        info = log_model(model_out, tracker.uri, tracker.trial_run(row["trial_number"], row["plan"]))
        print(f"logged model: {info.model_uri} (trial {row['trial_number']}'s MLflow run)")


COMMAND = Command(name="export", help="export the Pareto front's plans (YAML/JSON) and a deployable healed model "
                  "(safetensors, config, tokenizer; optionally logged to MLflow)", add_args=add_args, run=run)
