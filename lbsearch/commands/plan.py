"""``lbsearch plan``: describe a plan, or make the paper's threshold plan from a sensitivity table."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LBSearchError
from .common import Command, model_name, out_dir


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", nargs="?", help="plan string or file to describe (omit with --threshold)")
    p.add_argument("--threshold", nargs=2, type=int, metavar=("N_NONE", "N_LSWA"),
                   help="the paper's heuristic: remove the N_NONE layers least hurt by removal, then make the "
                        "N_LSWA least hurt by linearisation lswa (pinned layers stay softmax)")
    p.add_argument("--table", metavar="FILE", help="sensitivity.json for --threshold "
                   "(default: runs/<model>/sensitivity/sensitivity.json, written by `lbsearch sensitivity`)")
    p.add_argument("--space", metavar="FILE", help="search-space YAML (default: the packaged smollm2-135m space)")
    p.add_argument("--model", metavar="REF", help="override the space's model")
    p.add_argument("--out", metavar="DIR", help="also write the plan there as plan-<key>.json and .yaml "
                   "(default: print only)")


def _threshold(args, space, n_layers: int):
    from ..attention import ORIGINAL
    from ..sensitivity import SensitivityTable, threshold_plan

    n_none, n_lswa = args.threshold
    if n_none < 0 or n_lswa < 0 or n_none + n_lswa > n_layers:
        raise LBSearchError(f"--threshold {n_none} {n_lswa}: need 0 <= N_NONE + N_LSWA <= {n_layers} layers")
    path = Path(args.table) if args.table else Path("runs") / model_name(args) / "sensitivity" / "sensitivity.json"
    if not path.is_file():
        raise LBSearchError(f"{path}: no sensitivity table; run `lbsearch sensitivity` first or pass --table")
    try:
        table = SensitivityTable.load(path)
    except (ValueError, KeyError, TypeError) as exc:
        raise LBSearchError(f"{path}: not a sensitivity table ({type(exc).__name__})") from None
    if table.n_layers != n_layers:
        raise LBSearchError(f"{path}: table has {table.n_layers} layers, the model has {n_layers}")
    pinned = tuple(i for i in range(n_layers) if space.allowed_kinds(i) == [ORIGINAL])
    return threshold_plan(table, n_none, n_lswa, space.default_lswa(), pinned=pinned)


def run(args) -> None:
    from ..cost import ModelShape, kv_bytes_per_seq, predict, target_table
    from ..models import load_config
    from ..plan import resolve_plan
    from ..space import load_space

    if (args.plan is None) == (args.threshold is None):
        raise LBSearchError("give a PLAN to describe, or --threshold N_NONE N_LSWA")
    space = load_space(args.space)
    config = load_config(args.model or space.model)
    n_layers = config.num_hidden_layers
    plan = _threshold(args, space, n_layers) if args.threshold else resolve_plan(args.plan, space.lswa_defaults)
    plan.check(n_layers, args.plan or "plan")
    problems = space.violations(plan)
    shape = ModelShape.from_config(config)
    t = space.target
    table = target_table(t.device, shape, t.batch, t.context, space.all_specs(n_layers) + list(plan.layers))
    pred = predict(table, plan)
    print(f"plan   {plan}")
    print(f"key    {plan.key}")
    print("layers " + ", ".join(f"{plan.count(k)} {k}" for k in sorted({s.kind for s in plan.layers})))
    print(f"target {t.device}, batch {t.batch}, prompt {t.prompt}, output {t.output}: predicted decode "
          f"{pred['decode_tps']:,.0f} tok/s, {pred['decode_ratio']:.2f}x the all-softmax model ({table.source} costs)")
    print(f"KV     {kv_bytes_per_seq(shape, plan, t.prompt + t.output) / 2**20:.2f} MB per sequence at "
          f"{t.prompt + t.output} tokens ({pred['kv_ratio']:.2f}x)")
    if table.notes.get("fallback"):
        print(f"note   {table.notes['fallback']}")
    print("space  " + ("inside the space" if not problems else "outside the space: " + "; ".join(problems)))
    if args.out:
        folder = out_dir(args, Path(args.out))
        for suffix in (".json", ".yaml"):
            print(f"wrote {plan.save(folder / f'plan-{plan.key}{suffix}')}")


COMMAND = Command(name="plan", help="describe a plan (predicted speed, memory), or make the threshold plan from "
                  "a sensitivity table", add_args=add_args, run=run)
