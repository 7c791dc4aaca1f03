"""``lbsearch pareto``: print a study's Pareto front and write pareto.json/.csv/.png, hypervolume.png."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LBSearchError
from .common import Command, out_dir


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a search's run folder (reads its optuna.db)")
    p.add_argument("--storage", metavar="URL", help="Optuna RDB URL instead of RUN_DIR/optuna.db")
    p.add_argument("--study", metavar="NAME", help="study name (default: the storage's only study)")
    p.add_argument("--out", metavar="DIR", help="where the files go (default: RUN_DIR, else runs/<study>)")


def run(args) -> None:
    from ..search.pareto import load_front
    from ..search.report import render, write_report
    from ..search.store import load_study, shown, sqlite_url

    if args.storage is None:
        if args.run_dir is None:
            raise LBSearchError("give a RUN_DIR or --storage URL")
        if not (Path(args.run_dir) / "optuna.db").is_file():
            raise LBSearchError(f"{args.run_dir}: no optuna.db there (run `lbsearch search --out {args.run_dir}`)")
    url = args.storage or sqlite_url(args.run_dir)
    study = load_study(url, args.study)
    if "objectives" not in study.user_attrs:
        raise LBSearchError(f"study {study.study_name!r}: not written by `lbsearch search`")
    front = load_front(study)
    args.out = args.out or args.run_dir
    out = out_dir(args, Path("runs") / study.study_name)
    print(render(front))
    for kind, path in write_report(front, out, shown(url)).items():
        print(f"wrote {kind}: {path}")


COMMAND = Command(name="pareto", help="print a study's Pareto front (plans, quality with its fidelity, speed, "
                  "memory) and plot it", add_args=add_args, run=run)
