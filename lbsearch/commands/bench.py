"""``lbsearch bench``: decode throughput of plans against the base model, measured with the engine."""
from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from ..errors import LBSearchError
from .common import Command, add_common, model_name, out_dir

# (concurrency, prompt, output) defaults: a GPU serving run, or a CPU check that ends in seconds
GPU_DEFAULTS = ([1, 50, 100, 200], 1024, 256)
CPU_DEFAULTS = ([1, 8], 128, 32)


def add_args(p: argparse.ArgumentParser) -> None:
    add_common(p, "runs/<model>/bench")
    p.add_argument("--plans", nargs="+", metavar="PLAN", help="plan strings or files (the base is always included)")
    p.add_argument("--concurrency", nargs="+", type=int, metavar="N",
                   help="sequences decoded together (default: 1 50 100 200 on GPU, 1 8 on CPU)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens per sequence (default 1024 on GPU, 128 on CPU)")
    p.add_argument("--output-len", type=int, help="generated tokens per sequence (default 256 on GPU, 32 on CPU)")
    p.add_argument("--repeats", type=int, default=3, help="decode repeats; the median is reported (default 3)")
    p.add_argument("--memory-budget", type=float, metavar="GB", help="for max concurrency (default: device memory)")
    p.add_argument("--calibrate", action="store_true", help="refit the cost model to these measurements and save "
                   "the tables (in the cache, where the search finds them, and in --out)")
    p.add_argument("--cost-specs", nargs="+", metavar="TOKEN", default=[],
                   help="extra layer specs the cost tables must cover, e.g. L64 L128 L256")
    p.add_argument("--random-weights", action="store_true", help="benchmark the model's shape with random weights")
    p.add_argument("--shape", metavar="NAME", help="a built-in shape with random weights: llama-3.2-1b, smollm2-135m")


def _model(args, device: str):
    """(name, model): a built-in shape or the teacher, with random weights when asked."""
    import torch

    from ..models import load_teacher
    from ..profile import SHAPES, random_model
    from ..space import load_space

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if args.shape:
        if args.shape not in SHAPES:
            raise LBSearchError(f"--shape {args.shape!r}: choose from {', '.join(SHAPES)}")
        return args.shape, random_model(args.shape, dtype, device)
    ref = args.model or load_space(args.space).model
    model = load_teacher(ref, dtype=dtype, device=device)
    if args.random_weights:
        model = random_model(model.config, dtype, device)
    return model_name(args), model


def run(args) -> None:
    import lbsearch

    from ..bench import bandwidth_floor, calibrate_from_rows, model_shape, render, sweep, write_results
    from ..plan import Plan, resolve_plan
    from ..profile import measure_machine
    from ..workspace import pick_device

    device = str(pick_device(args.device))
    conc, prompt, output = GPU_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS
    conc, prompt, output = args.concurrency or conc, args.prompt_len or prompt, args.output_len or output
    if min(conc) < 1 or prompt < 1 or output < 2 or args.repeats < 1:
        raise LBSearchError("--concurrency, --prompt-len and --repeats must be >= 1 and --output-len >= 2")
    extra = [resolve_plan(t)[0] for t in args.cost_specs]
    out = out_dir(args, Path("runs") / (args.shape or model_name(args)) / "bench")
    name, model = _model(args, device)
    shape = model_shape(model)
    plans = [resolve_plan(p).check(shape.layers, p) for p in args.plans or []]
    budget = int(args.memory_budget * 2**30) if args.memory_budget else None
    cost_plans = plans + [Plan.uniform(shape.layers, s) for s in extra]
    rows, tables = sweep(model, plans, conc, prompt, output, repeats=args.repeats, budget_bytes=budget,
                         cost_plans=cost_plans)
    bw = measure_machine(device).bandwidth
    rows += [bandwidth_floor(shape, b, prompt, output, bw) for b in conc]
    if args.calibrate:
        notes = {"command": "lbsearch " + " ".join(args.argv), "date": datetime.date.today().isoformat(),
                 "code_version": lbsearch.code_version()}
        for batch, table in calibrate_from_rows(tables, rows, notes, out).items():
            print(f"calibrated cost table (batch {batch}, context {table.context}): {table.notes['path']}")
    print(render(rows))
    meta = {"model": name, "device": tables[conc[0]].device, "prompt_len": prompt, "output_len": output,
            "cost_source": {b: t.source for b, t in tables.items()},
            "title": f"{name}: prompt {prompt}, output {output}"}
    for kind, path in write_results(out, "bench", rows, meta).items():
        print(f"wrote {kind}: {path}")


COMMAND = Command(name="bench", help="decode throughput of plans vs the base at several concurrencies "
                  "(table, CSV/JSON, plot)", add_args=add_args, run=run)
