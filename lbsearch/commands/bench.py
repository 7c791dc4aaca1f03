"""``lbsearch bench``: decode throughput of plans against the base model, measured with the engine:
a static batch (``--mode static``) or a closed loop of requests refilling their slots (``--mode requests``)."""
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
    p.add_argument("--mode", choices=("static", "requests"), default="static",
                   help="static: one batch decoded together (default); requests: a closed loop of --concurrency "
                   "slots, each refilled with a new request when its sequence ends (TTFT, TPOT p50/p99)")
    p.add_argument("--requests", type=int, metavar="N", help="requests served per concurrency in --mode requests "
                   "(default: 4 per slot)")
    p.add_argument("--lengths", choices=("fixed", "uniform", "lognormal"), default="uniform",
                   help="--mode requests: distribution of prompt and output lengths around --prompt-len and "
                   "--output-len (default uniform)")
    p.add_argument("--spread", type=float, default=0.5, help="--mode requests: half-width of uniform lengths as a "
                   "fraction of the mean, or sigma of lognormal ones (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="--mode requests: seed of the drawn requests (default 0)")


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


def _check(args, conc, prompt, output) -> None:
    if min(conc) < 1 or prompt < 1 or output < 2 or args.repeats < 1:
        raise LBSearchError("--concurrency, --prompt-len and --repeats must be >= 1 and --output-len >= 2")
    if args.mode == "requests":
        if args.calibrate:
            raise LBSearchError("--calibrate fits static-batch step times: use it with --mode static")
        if (args.requests is not None and args.requests < 1) or args.spread < 0:
            raise LBSearchError("--requests must be >= 1 and --spread >= 0")


def run(args) -> None:
    from ..bench import model_shape
    from ..plan import Plan, resolve_plan
    from ..workspace import pick_device

    device = str(pick_device(args.device))
    conc, prompt, output = GPU_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS
    conc, prompt, output = args.concurrency or conc, args.prompt_len or prompt, args.output_len or output
    _check(args, conc, prompt, output)
    extra = [resolve_plan(t)[0] for t in args.cost_specs]
    out = out_dir(args, Path("runs") / (args.shape or model_name(args)) / "bench")
    name, model = _model(args, device)
    shape = model_shape(model)
    plans = [resolve_plan(p).check(shape.layers, p) for p in args.plans or []]
    meta = {"model": name, "mode": args.mode, "prompt_len": prompt, "output_len": output,
            "title": f"{name}: prompt {prompt}, output {output}"}
    if args.mode == "requests":
        _run_requests(args, model, plans, conc, prompt, output, out, meta)
    else:
        _run_static(args, model, plans + [Plan.uniform(shape.layers, s) for s in extra], plans, conc, prompt,
                    output, out, meta, device)


def _run_static(args, model, cost_plans, plans, conc, prompt, output, out, meta, device) -> None:
    import lbsearch

    from ..bench import bandwidth_floor, calibrate_from_rows, model_shape, render, sweep, write_results
    from ..profile import measure_machine

    shape = model_shape(model)
    budget = int(args.memory_budget * 2**30) if args.memory_budget else None
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
    meta.update(device=tables[conc[0]].device, cost_source={b: t.source for b, t in tables.items()})
    for kind, path in write_results(out, "bench", rows, meta).items():
        print(f"wrote {kind}: {path}")


def _run_requests(args, model, plans, conc, prompt, output, out, meta) -> None:
    from ..bench import REQUEST_COLUMNS, render, sweep_requests, write_results

    rows = sweep_requests(model, plans, conc, prompt, output, requests=args.requests, distribution=args.lengths,
                          spread=args.spread, seed=args.seed)
    print(render(rows, REQUEST_COLUMNS))
    meta.update(device=str(model.lm_head.weight.device), lengths=args.lengths, spread=args.spread, seed=args.seed,
                title=f"{meta['model']}: requests, prompt ~{prompt}, output ~{output} ({args.lengths})")
    for kind, path in write_results(out, "bench_requests", rows, meta, "throughput_tps",
                                    "generated tokens/s").items():
        print(f"wrote {kind}: {path}")


COMMAND = Command(name="bench", help="decode throughput of plans vs the base at several concurrencies "
                  "(table, CSV/JSON, plot)", add_args=add_args, run=run)
