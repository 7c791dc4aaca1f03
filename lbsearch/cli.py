"""The ``lbsearch`` command line. Each command is a small function registered in COMMANDS."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

from .errors import LBSearchError

COMMANDS: dict[str, tuple[Callable, Callable, str]] = {}


def command(name: str, help_text: str):
    """Register ``fn(args)`` with an ``add_args(parser)`` defined as ``fn.add_args``."""

    def wrap(fn):
        COMMANDS[name] = (fn, getattr(fn, "add_args", lambda p: None), help_text)
        return fn

    return wrap


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--space", metavar="FILE", help="search-space YAML (default: the packaged smollm2-135m space)")
    parser.add_argument("--model", metavar="REF", help="override the space's model: registry alias, local HF dir or hub id")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: runs/<model>/<command>)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _out_dir(args, model_ref: str, command_name: str) -> Path:
    out = Path(args.out) if args.out else Path("runs") / Path(model_ref).name / command_name
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_context(args):
    """Space, teacher, tokenizer and held-out blocks as the arguments ask."""
    from .data import load_corpus, pack_blocks, split_corpus
    from .models import load_teacher, load_tokenizer
    from .space import load_space

    space = load_space(args.space)
    ref = args.model or space.model
    model = load_teacher(ref, device=_device(args.device))
    tokenizer = load_tokenizer(ref)
    space.check_layers(model.config.num_hidden_layers, args.space or "space")
    splits = split_corpus(load_corpus(space.data, model, tokenizer), space.data)
    return space, ref, model, tokenizer, splits


def cmd_sensitivity(args) -> None:
    from .data import pack_blocks
    from .evaluate import teacher_logits
    from .plan import LayerSpec
    from .sensitivity import sensitivity, sensitivity_naive

    space, ref, model, tokenizer, splits = load_context(args)
    tokens = args.tokens or space.budgets.sensitivity_tokens
    blocks = pack_blocks(splits["heldout"], tokenizer, space.data.seq_len, max_tokens=tokens)
    teacher = teacher_logits(model, blocks)
    specs = {"lswa": space.default_lswa(), "none": LayerSpec(kind="none")}
    start = time.perf_counter()
    table = (sensitivity_naive if args.naive else sensitivity)(model, blocks, teacher, specs)
    elapsed = time.perf_counter() - start
    print(table.render())
    paths = table.save(_out_dir(args, ref, "sensitivity"))
    print(f"sensitivity of {len(table.rows['lswa'])} layers x {len(specs)} kinds on {blocks.numel()} tokens "
          f"in {elapsed:.1f} s")
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")


def _sensitivity_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--tokens", type=int, help="held-out tokens (default: budgets.sensitivity_tokens)")
    p.add_argument("--naive", action="store_true", help="full forward per changed layer (the slow reference)")


cmd_sensitivity.add_args = _sensitivity_args
command("sensitivity", "per-layer quality drop for lswa and none (table, CSV/JSON, heatmap)")(cmd_sensitivity)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lbsearch", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (fn, add_args, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        args.func(args)
    except LBSearchError as exc:
        print(f"lbsearch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lbsearch: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
