"""What the commands share: the record they export, common arguments, output folders, workspaces."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import LBSearchError


@dataclass(frozen=True, kw_only=True)
class Command:
    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


def add_common(parser: argparse.ArgumentParser, out_help: str) -> None:
    parser.add_argument("--space", metavar="FILE", help="search-space YAML (default: the packaged smollm2-135m space)")
    parser.add_argument("--model", metavar="REF", help="override the space's model: registry alias, local HF dir, "
                        ".gguf file or hub id")
    parser.add_argument("--out", metavar="DIR", help=f"output folder (default: {out_help})")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def out_dir(args, default: Path) -> Path:
    """``--out`` or ``default``, created; a clear error when it cannot be."""
    from ..io import writable_dir

    return writable_dir(Path(args.out) if args.out else default)


def add_search_options(parser: argparse.ArgumentParser) -> None:
    """The search's budget, sampler and study location (``search`` and ``run``)."""
    parser.add_argument("--trials", type=int, help="complete trials in the study (default: the space's search.trials)")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS", help="stop asking for trials after this long")
    parser.add_argument("--sampler", help="base sampler: tpe (multi-objective TPE, default), nsga2, gp, random")
    parser.add_argument("--seed", type=int, help="sampler seed (default: the space's search.seed)")
    parser.add_argument("--storage", metavar="URL", help="Optuna RDB URL, e.g. postgresql+psycopg2://user@host/db "
                        "(default: sqlite in the output folder)")
    parser.add_argument("--study", metavar="NAME", help="study name (default: lbsearch-<model>)")


def model_name(args) -> str:
    """A short name for output folders: the model reference's last path part."""
    from ..space import load_space

    ref = args.model or load_space(args.space).model
    return Path(ref).stem if ref.endswith(".gguf") else Path(ref).name


def open_workspace(args, **kwargs):
    from ..workspace import Workspace

    return Workspace.open(args.space, device=args.device, model=args.model, **kwargs)


def check_positive(args, *names: str) -> None:
    """One-line errors for numeric flags that must be positive, before any work starts."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise LBSearchError(f"--{name.replace('_', '-')} must be positive, got {value}")


def early_plan(args, text: str):
    """The plan of ``text`` (string or file) read with the space's defaults and checked against the
    model's layer count when that is known without loading weights: bad plans fail before heavy work."""
    from ..models import model_num_layers
    from ..plan import resolve_plan
    from ..space import load_space

    space = load_space(args.space)
    plan = resolve_plan(text, space.lswa_defaults)
    n_layers = model_num_layers(args.model or space.model)
    return plan.check(n_layers, text) if n_layers else plan
