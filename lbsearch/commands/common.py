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
    out = Path(args.out) if args.out else default
    if out.exists() and not out.is_dir():
        raise LBSearchError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".lbsearch-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise LBSearchError(f"--out {out}: cannot write there ({exc.strerror})") from None
    return out


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
