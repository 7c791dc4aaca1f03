"""Serving benchmark on one GPU: the decode engine under plans vs the base model, HF generate(),
the bandwidth floor, and the cost model's predicted vs measured speedups.

Shapes: Llama-3.2-1B and SmolLM2-135M with random bf16 weights (shapes decide speed). Results
go to ``--out`` (JSON/CSV/PNG per shape, written as each finishes); a short table is printed last.

    PYTHONUNBUFFERED=1 python benchmarks/bench_serving.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from lbsearch import Plan, apply_plan
from lbsearch.bench import bandwidth_floor, bench_hf_generate, model_shape, render, sweep, write_results
from lbsearch.cost import calibrate, relative_error
from lbsearch.profile import measure_machine, random_model
from lbsearch.engine import DecodeEngine

ROOT = Path(__file__).resolve().parent


def smollm_plans() -> dict[str, str]:
    from lbsearch.sensitivity import SensitivityTable, threshold_plan

    table = SensitivityTable.load(ROOT / "results" / "smollm2-135m_sensitivity.json")
    return {"threshold (10S/10L/10N)": str(threshold_plan(table, 10, 10, pinned=(0, 1))),
            "all-lswa but 0-1": "SS" + "L" * 28, "every other none": "SN" * 15,
            "SLN x10": "SLN" * 10, "SS + (LN) x14": "SS" + "LN" * 14}


PLANS = {
    "llama-3.2-1b": lambda: {"all-lswa but 0-1": "SS" + "L" * 14, "SS + (LN) x7": "SS" + "LN" * 7,
                             "SLN x5 + L": "SLN" * 5 + "L", "every other none": "SN" * 8,
                             "SSL.. 4S/8L/4N": "SSLLNLSLLNLSLLNN"},
    "smollm2-135m": smollm_plans,
}


def check_engine(log) -> list[dict]:
    """Engine (CUDA graph, Triton kernels) vs HF generate() on tiny random models on the GPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = []
    for family, dtype in [("llama", torch.float32), ("qwen3", torch.float32), ("llama", torch.bfloat16)]:
        torch.manual_seed(0)
        cfg = AutoConfig.for_model(family, vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                                   attn_implementation="sdpa")
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).cuda().eval().requires_grad_(False)
        model.generation_config.eos_token_id = None
        ids = torch.randint(0, 512, (6, 300), device="cuda")
        for plan in ["SSSS", "SL32NL16s2", "NNNN"]:
            with apply_plan(model, Plan.parse(plan)):
                ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                                     pad_token_id=0)[:, 300:]
                got = DecodeEngine(model, 6, 340).generate(ids, 40)[:, 300:]
            agree = (ref == got).float().mean().item()
            first_diff = int((ref != got).any(0).float().argmax()) if agree < 1 else None
            out.append({"family": family, "dtype": str(dtype), "plan": plan, "token_agreement": agree,
                        "exact": agree == 1.0, "first_diff_step": first_diff})
            log(f"check {family} {dtype} {plan}: agreement {agree:.3f}")
    return out


def validation(rows, tables) -> list[dict]:
    """Predicted vs measured speedup per plan and batch: raw table, and leave-one-plan-out calibrated."""
    out = []
    for batch, table in tables.items():
        mine = [r for r in rows if r["batch"] == batch and "is_base" in r]
        for r in mine:
            if r["is_base"]:
                continue
            others = [(Plan.parse(o["plan"]), batch / o["decode_tps"]) for o in mine if o is not r]
            loo = calibrate(table, others)
            plan = Plan.parse(r["plan"])
            loo_ratio = loo.step_time(Plan.softmax(len(plan))) / loo.step_time(plan)
            out.append({"batch": batch, "plan": r["plan"], "measured": r["speedup"], "predicted": r["pred_ratio"],
                        "error": r["ratio_err"], "loo_calibrated": loo_ratio,
                        "loo_error": relative_error(loo_ratio, r["speedup"]), "table": table.source})
    return out


def run_shape(name, args, out: Path, log) -> dict:
    t0 = time.time()
    model = random_model(name, torch.bfloat16, "cuda")
    shape = model_shape(model)
    from lbsearch.kernels.decode_attention import split_kv

    tuning = split_kv.tune(max(args.concurrency), shape.heads, shape.kv_heads, shape.head_dim,
                           args.prompt_len + args.output_len)
    log(f"decode-attention launch {split_kv.LAUNCH}: best {min(r['us'] for r in tuning):.1f} us, "
        f"{max(r['tb_s'] for r in tuning):.2f} TB/s (of {len(tuning)} tried)")
    named = PLANS[name]()
    plans = [Plan.parse(p) for p in named.values()]
    log(f"== {name}: {shape.layers} layers; plans {named}")
    rows, tables = sweep(model, plans, args.concurrency, args.prompt_len, args.output_len, repeats=args.repeats, log=log)
    machine = measure_machine("cuda")
    rows += [bandwidth_floor(shape, b, args.prompt_len, args.output_len, machine.bandwidth) for b in args.concurrency]
    result = {"shape": name, "plans": named, "rows": rows, "validation": validation(rows, tables),
              "tables": {b: t.to_dict() for b, t in tables.items()}, "machine": vars(machine),
              "decode_attention_tuning": tuning}
    write_results(out, f"serving_{name}", rows, {"title": f"{name} (random bf16), prompt {args.prompt_len}, "
                                                          f"output {args.output_len}", **args.meta})
    (out / f"serving_{name}_full.json").write_text(json.dumps(result, indent=1, default=str))
    for cache in args.hf if name == args.hf_shape else []:
        for batch in args.hf_batches:
            try:
                hf = bench_hf_generate(model, batch, args.prompt_len, args.hf_output_len, cache)
                rows.append(hf)
                log(f"  HF generate {cache} batch {batch}: {hf['decode_tps']:,.0f} tok/s")
            except Exception as exc:  # noqa: BLE001 - report and go on
                log(f"  HF generate {cache} failed: {exc!r}")
            torch.cuda.empty_cache()
    result["rows"] = rows
    (out / f"serving_{name}_full.json").write_text(json.dumps(result, indent=1, default=str))
    write_results(out, f"serving_{name}", rows, {"title": f"{name} (random bf16)", **args.meta})
    log(f"== {name} done in {time.time() - t0:.0f} s")
    del model
    torch.cuda.empty_cache()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench_serving")
    p.add_argument("--shapes", nargs="+", default=["llama-3.2-1b", "smollm2-135m"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[50, 100, 200])
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--hf", nargs="*", default=["static", "dynamic"], help="HF generate cache implementations")
    p.add_argument("--hf-shape", default="llama-3.2-1b")
    p.add_argument("--hf-batches", nargs="+", type=int, default=[200])
    p.add_argument("--hf-output-len", type=int, default=64)
    p.add_argument("--no-check", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    summary = {"meta": args.meta}
    if not args.no_check:
        try:
            summary["check"] = check_engine(log)
        except Exception:  # noqa: BLE001
            summary["check"] = traceback.format_exc()
            log(summary["check"])
        (out / "check.json").write_text(json.dumps(summary["check"], indent=1))
    for name in args.shapes:
        try:
            summary[name] = run_shape(name, args, out, log)
        except Exception:  # noqa: BLE001 - keep the other shape's results
            log(traceback.format_exc())
    for name in args.shapes:
        if name in summary:
            res = summary[name]
            log(f"\n{name}: plans {res['plans']}\n" + render(res["rows"]))
            log(render(res["validation"], ["plan", "batch", "measured", "predicted", "error", "loo_calibrated",
                                           "loo_error"]))


if __name__ == "__main__":
    main()
