"""Decode step and static-batch serving: today's eager engine vs the fused step vs the fused step compiled.

For each shape (random bf16 weights) and plan: the CUDA-graph step time at ``--batch`` rows and
``--context`` cached tokens, CUDA kernels per step and per decoder layer (torch.profiler over one
eager-mode step; per layer = (step - the step without its decoder layers) / layers), the bytes-floor
(weights the plan reads + every cache, at ``--bandwidth``: by default the device's measured copy
bandwidth) and step/floor. Then static-batch serving
(``--serving PROMPT/OUTPUT`` pairs, concurrency ``--batch``): tokens/s of each plan under the eager and
fused engines, speedups over the base of the same engine and the fused/eager ratio, side by side.

    PYTHONPATH=. PYTHONUNBUFFERED=1 python benchmarks/bench_decode_step.py --out $OUT
    python benchmarks/bench_decode_step.py --shapes smollm2-135m --plans base all-lswa-but-2 --no-serving
    python benchmarks/bench_decode_step.py --smoke --out /tmp/smoke     # tiny CPU model, no graph (tests)

Full JSON goes to ``$OUT/decode_step.json`` (or ``--out``), rewritten after every row; a table is printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from lbsearch import Plan, apply_plan
from lbsearch.cost import ModelShape, kv_bytes_per_seq
from lbsearch.engine import DecodeEngine
from lbsearch.profile import Timer, fake_fill, measure_machine, random_model

ENGINES = {"eager": dict(fused=False), "fused": dict(fused=True),
           "fused-fmap-in": dict(fused=True, fmap_in_decode=True),  # the LSWA feature map inside its decode kernel
           "compiled": dict(fused=True, compile=True)}


def plans_for(layers: int) -> dict[str, str]:
    """The issue's plans: base, all-LSWA but two, SS + (L64 N) x .., at most 1/3 softmax, all none."""
    rest = layers - 2
    third = ("SLN" * layers)[:layers]  # a softmax layer in every three
    return {"base": "S" * layers, "all-lswa-but-2": "SS" + "L64" * rest,
            "ss+(l64n)": "SS" + ("L64N" * rest)[: 4 * (rest // 2)] + ("L64" if rest % 2 else ""),
            "third-softmax": third.replace("L", "L64"), "all-none": "N" * layers}


# -- measurements -------------------------------------------------------------------------------
def count_kernels(engine, top: int = 12) -> dict | None:
    """CUDA kernels of one eager-mode step, of the step without its decoder layers, and per layer; and
    where the step's GPU time goes: the ``top`` kernels by time (name, launches, us) and the total
    kernel time, which excludes launch gaps (None on CPU)."""
    if engine.device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    def one_step() -> tuple[int, list]:
        engine._step()  # warm (a first call may compile or autotune)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine._step()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
        times = [(e.key, e.count, getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0))
                 for e in events]
        return sum(e.count for e in events), sorted(times, key=lambda t: -t[2])

    snap = engine.snapshot()
    n_layers = len(engine.layers)
    step, times = one_step()
    body, layers = engine._body, engine.layers
    try:  # the same step without decoder layers: embedding, final norm, head, pick, bookkeeping
        if body is not None:
            engine._body, saved = engine.decoder, engine.decoder.layers
            engine.decoder.layers = []
        else:
            engine.layers = []
        outside = one_step()[0]
    finally:
        engine._body, engine.layers = body, layers
        if body is not None:
            engine.decoder.layers = saved
    engine.restore(snap)
    return {"per_step": step, "outside_layers": outside, "per_layer": (step - outside) / n_layers,
            "kernel_us": sum(t[2] for t in times),
            "top": [{"kernel": k[:120], "launches": n, "us": us} for k, n, us in times[:top]]}


def step_ms(engine, context: int, steps: int, repeats: int) -> float:
    """Median ms of one decode step (graph replays on CUDA) at ``context`` cached tokens."""
    times = []
    for _ in range(repeats):
        fake_fill(engine, context)
        with Timer(engine.device) as t:
            engine.decode(steps)
        times.append(1000 * t.seconds / steps)
    return statistics.median(times)


def floor_ms(shape: ModelShape, plan: Plan, batch: int, context: int, bandwidth: float) -> float:
    """Bytes a step must read (the weights the plan uses, every row's cache) at ``bandwidth``, in ms."""
    return 1000 * (shape.weight_bytes(plan) + batch * kv_bytes_per_seq(shape, plan, context)) / bandwidth


def step_row(model, shape, name, plan, engine_name, args) -> dict:
    t0 = time.time()
    with apply_plan(model, plan):
        engine = DecodeEngine(model, args.batch, args.context + args.steps + 2, graph=args.graph,
                              **ENGINES[engine_name])
        build_s = time.time() - t0
        fake_fill(engine, args.context)
        kernels = count_kernels(engine)
        ms = step_ms(engine, args.context, args.steps, args.repeats)
        compiled = engine.compiled
        paths = engine.decoder.fused_counts() if engine.fused else None
    del engine
    floor = floor_ms(shape, plan, args.batch, args.context, args.bandwidth)
    return {"section": "step", "plan_name": name, "plan": str(plan), "engine": engine_name, "step_ms": ms,
            "floor_ms": floor, "step_over_floor": ms / floor, "kernels": kernels, "build_s": build_s,
            "compiled": compiled, "fused_paths": paths, "batch": args.batch, "context": args.context}


def serve(model, plan, engine_name, batch: int, prompt_len: int, output_len: int, repeats: int) -> dict:
    """Static batch: ``batch`` random prompts prefilled, ``output_len - 1`` greedy steps timed (median of repeats)."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    with apply_plan(model, plan):
        engine = DecodeEngine(model, batch, prompt_len + output_len, **ENGINES[engine_name])
        engine.configure()
        engine.prefill(ids)
        snap = engine.snapshot()
        times = []
        for _ in range(repeats):
            engine.restore(snap)
            with Timer(engine.device) as t:
                engine.decode(output_len - 1)
            times.append(t.seconds)
    del engine
    t = statistics.median(times)
    return {"tps": batch * (output_len - 1) / t, "tpot_ms": 1000 * t / (output_len - 1)}


# -- tables -------------------------------------------------------------------------------------
def step_table(rows: list[dict]) -> str:
    lines = [f"{'shape':13} {'plan':15} {'engine':13} {'step ms':>8} {'floor ms':>8} {'x floor':>7} "
             f"{'kern/step':>9} {'kern/layer':>10} {'vs eager':>8}"]
    eager = {(r["shape"], r["plan_name"]): r["step_ms"] for r in rows if r["engine"] == "eager"}
    for r in rows:
        k = r["kernels"] or {}
        ref = eager.get((r["shape"], r["plan_name"]))
        lines.append(f"{r['shape']:13} {r['plan_name']:15} {r['engine']:13} {r['step_ms']:8.3f} {r['floor_ms']:8.3f} "
                     f"{r['step_over_floor']:7.2f} {k.get('per_step', ''):>9} "
                     f"{('%.1f' % k['per_layer']) if k else '':>10} {('%.2f' % (ref / r['step_ms'])) if ref else '':>8}")
    return "\n".join(lines)


def profile_table(rows: list[dict], top: int = 5) -> str:
    """Where each step's GPU time goes: its top kernels by time, as a share of the step's kernel time."""
    lines = []
    for r in rows:
        k = r.get("kernels") or {}
        if not k.get("top"):
            continue
        lines.append(f"{r['shape']} {r['plan_name']} {r['engine']}: kernels {k['kernel_us'] / 1000:.3f} ms "
                     f"of a {r['step_ms']:.3f} ms step")
        for t in k["top"][:top]:
            lines.append(f"    {t['us'] / max(k['kernel_us'], 1e-9):6.1%} {t['us']:9.1f} us {t['launches']:5d}x  "
                         f"{t['kernel'][:90]}")
    return "\n".join(lines)


def serving_table(rows: list[dict]) -> str:
    engines = [e for e in ENGINES if any(f"{e}_tps" in r for r in rows)]
    lines = [f"{'shape':13} {'prompt/out':10} {'plan':15} " + " ".join(f"{e + ' tok/s':>19} {e + ' x base':>20}"
                                                                      for e in engines)
             + f" {'floor x base':>12} {'fused/floor':>11}"]
    nan = float("nan")
    for r in rows:
        lines.append(f"{r['shape']:13} {r['prompt_len']:>5}/{r['output_len']:<4} {r['plan_name']:15} "
                     + " ".join(f"{r.get(f'{e}_tps', nan):19,.0f} {r.get(f'{e}_x_base', nan):20.2f}" for e in engines)
                     + f" {r['floor_x_base']:12.2f} {r.get('fused_over_floor', nan):11.2f}")
    return "\n".join(lines)


# -- the run ------------------------------------------------------------------------------------
def smoke_model():
    """A tiny initialised float32 Llama on CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_implementation="sdpa")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().requires_grad_(False)


def run_shape(shape_name: str, args, result: dict, save, log) -> None:
    model = smoke_model() if args.smoke else random_model(shape_name, torch.bfloat16, "cuda")
    shape = ModelShape.from_config(model.config, model.lm_head.weight.element_size())
    named = {k: Plan.parse(v) for k, v in plans_for(shape.layers).items() if not args.plans or k in args.plans}
    log(f"== {shape_name}: {shape.layers} layers; plans { {k: str(v) for k, v in named.items()} }")
    for name, plan in named.items():
        for engine_name in args.engines:
            if engine_name == "compiled" and "all" not in args.compile_plans and name not in args.compile_plans:
                continue
            row = {"shape": shape_name, **step_row(model, shape, name, plan, engine_name, args)}
            result["step"].append(row)
            save()
            log(f"  step {name:15} {engine_name:9} {row['step_ms']:.3f} ms (floor {row['floor_ms']:.3f}) "
                f"kernels {row['kernels']} build {row['build_s']:.1f} s")
    for prompt_len, output_len in args.serving:
        base_floor = None
        for name, plan in named.items():
            ctx = prompt_len + output_len // 2
            floor = floor_ms(shape, plan, args.batch, ctx, args.bandwidth)
            base_floor = base_floor or floor_ms(shape, Plan.softmax(shape.layers), args.batch, ctx, args.bandwidth)
            row = {"shape": shape_name, "section": "serving", "plan_name": name, "plan": str(plan),
                   "prompt_len": prompt_len, "output_len": output_len, "batch": args.batch,
                   "floor_tps": args.batch / floor * 1000, "floor_x_base": base_floor / floor}
            for engine_name in [e for e in args.engines if e != "compiled"]:
                out = serve(model, plan, engine_name, args.batch, prompt_len, output_len, args.serving_repeats)
                row[f"{engine_name}_tps"], row[f"{engine_name}_tpot_ms"] = out["tps"], out["tpot_ms"]
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            result["serving"].append(row)
            save()
            log(f"  serve {prompt_len}/{output_len} {name:15} " + "  ".join(
                f"{e} {row[f'{e}_tps']:,.0f} tok/s" for e in args.engines if f"{e}_tps" in row))
    add_ratios(result["serving"])
    save()
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def add_ratios(rows: list[dict]) -> None:
    base = {(r["shape"], r["prompt_len"]): r for r in rows if r["plan_name"] == "base"}
    for r in rows:
        b = base.get((r["shape"], r["prompt_len"]))
        for e in ENGINES:
            if b and f"{e}_tps" in r and f"{e}_tps" in b:
                r[f"{e}_x_base"] = r[f"{e}_tps"] / b[f"{e}_tps"]
        if "fused_tps" in r and "eager_tps" in r:
            r["fused_over_eager"] = r["fused_tps"] / r["eager_tps"]
        if "fused_tps" in r:
            r["fused_over_floor"] = r["floor_tps"] / r["fused_tps"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "runs/bench_decode_step"))
    p.add_argument("--shapes", nargs="+", default=["llama-3.2-1b", "smollm2-135m"])
    p.add_argument("--plans", nargs="*", default=[], help=f"plan names (default all): {', '.join(plans_for(16))}")
    p.add_argument("--engines", nargs="+", default=["eager", "fused", "compiled"], choices=list(ENGINES))
    p.add_argument("--compile-plans", nargs="*", default=["base"], help="plans the compiled engine runs ('all')")
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--context", type=int, default=1152)
    p.add_argument("--steps", type=int, default=32, help="graph replays per timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--serving-repeats", type=int, default=2)
    p.add_argument("--bandwidth", type=float, default=0.0,
                   help="bytes/s of the floor (default: this device's measured copy bandwidth; H200 about 4.2e12)")
    p.add_argument("--serving", nargs="*", default=["1024/256", "4096/128"], help="PROMPT/OUTPUT pairs")
    p.add_argument("--no-serving", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny random CPU model, no CUDA graph (a test runs it)")
    args = p.parse_args(argv)
    args.serving = [] if args.no_serving else [tuple(int(x) for x in s.split("/")) for s in args.serving]
    args.graph = None
    if args.smoke:
        args.shapes, args.batch, args.context, args.steps, args.repeats, args.graph = ["tiny-cpu"], 3, 24, 4, 1, False
        args.serving = [] if args.no_serving else [(16, 6)]
        if args.compile_plans == ["base"]:
            args.engines = [e for e in args.engines if e != "compiled"]  # compiling on CPU takes tens of seconds
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.bandwidth <= 0:
        args.bandwidth = measure_machine("cuda" if torch.cuda.is_available() else "cpu").bandwidth
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "args": {k: v for k, v in vars(args).items()}}
    result = {"meta": meta, "step": [], "serving": []}
    path = out / "decode_step.json"
    save = lambda: path.write_text(json.dumps(result, indent=1, default=str))
    log = lambda *a: print(*a, flush=True)
    t0 = time.time()
    for name in args.shapes:
        run_shape(name, args, result, save, log)
    result["meta"]["seconds"] = time.time() - t0
    save()
    profiled = profile_table(result["step"])
    if profiled:
        log(f"\nwhere the step's GPU time goes (one eager step under torch.profiler):\n{profiled}")
    log(f"\n{step_table(result['step'])}")
    if result["serving"]:
        log(f"\n{serving_table(result['serving'])}")
    log(f"\n{path} ({result['meta']['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
