"""Heal SmolLM2-135M: threshold plan, remove-only and uniform lswa side by side, plus ablations.

GPU:  python benchmarks/bench_heal.py --model /tmp/smol.gguf --tokens 10000000 --runs threshold remove uniform
      python benchmarks/bench_heal.py --model /tmp/smol.gguf --tokens 2000000 --runs uniform-s0 threshold-no-lora
CPU:  python benchmarks/bench_heal.py --device cpu --tokens 4096 --runs threshold
      (--long-context 512 2048 4096 [--horizons 1536]: real-text ppl per span of context [linear part bounded])
Plans: threshold = the paper's heuristic on the measured sensitivity table (10 none, 10 lswa,
layers 0-1 pinned softmax); remove = the same 10 layers removed, the rest softmax; uniform = every
layer lswa but 0 and 1. A run is a plan plus changes (LSWA spec, transfer, healing config); see
RUNS; a run changes the packaged space's healing recipe (its ``heal:`` section), which ``threshold``,
``remove`` and ``uniform`` use as it is. One Workspace serves every run: each plan's student gives the teacher back exactly. Quality
is measured on held-out teacher text and on held-out real text (python-docs: standard-library
docstrings). Full reports go to $OUT/bench_heal.json; a short table is printed last.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from lbsearch.attention.lswa import linear_horizon
from lbsearch.plan import Plan
from lbsearch.sensitivity import SensitivityTable, remove_only_plan, threshold_plan, uniform_plan
from lbsearch.space import SourceConfig, load_space
from lbsearch.workspace import Workspace

TABLE = Path(__file__).parent / "results" / "smollm2-135m_sensitivity.json"


@dataclass(frozen=True)
class Run:
    plan: str
    spec: dict = field(default_factory=dict)  # changes to every lswa layer's spec
    heal: dict = field(default_factory=dict)  # changes to the HealConfig
    transfer_steps: int | None = None


RUNS = {
    "threshold": Run("threshold"),
    "remove": Run("remove"),
    "uniform": Run("uniform"),
    "uniform-s0": Run("uniform", spec=dict(sinks=0)),
    "uniform-f32": Run("uniform", spec=dict(feature_dim=32)),
    "uniform-f128": Run("uniform", spec=dict(feature_dim=128)),
    "uniform-w32": Run("uniform", spec=dict(window=32)),
    "uniform-w128": Run("uniform", spec=dict(window=128)),
    "uniform-no-transfer": Run("uniform", transfer_steps=0),
    "uniform-no-lora": Run("uniform", heal=dict(lora_rank=0)),
    "threshold-no-transfer": Run("threshold", transfer_steps=0),
    "threshold-no-lora": Run("threshold", heal=dict(lora_rank=0)),
    "threshold-attn-lora": Run("threshold", heal=dict(lora_mlp=False)),
    "threshold-r64": Run("threshold", heal=dict(lora_rank=64, lora_alpha=128)),
    "threshold-online": Run("threshold", heal=dict(teacher="online")),
    "threshold-s0": Run("threshold", spec=dict(sinks=0)),
    "threshold-f128": Run("threshold", spec=dict(feature_dim=128)),
    "threshold-w128": Run("threshold", spec=dict(window=128)),
    "threshold-T2": Run("threshold", heal=dict(temperature=2.0)),
    "uniform-r64": Run("uniform", heal=dict(lora_rank=64, lora_alpha=128)),
    "uniform-T2": Run("uniform", heal=dict(temperature=2.0)),
    "uniform-w256": Run("uniform", spec=dict(window=256)),
    "remove-r64": Run("remove", heal=dict(lora_rank=64, lora_alpha=128)),
    "threshold-full": Run("threshold", heal=dict(tune="full")),
    "uniform-full": Run("uniform", heal=dict(tune="full")),
    "uniform-full-lr2e-4": Run("uniform", heal=dict(tune="full", full_lr=2e-4)),
    "remove-full": Run("remove", heal=dict(tune="full")),
    "threshold-L2048": Run("threshold", heal=dict(seq_len=2048, batch_size=8)),
    "threshold-L4096": Run("threshold", heal=dict(seq_len=4096)),  # 4 a step: as many tokens
    "uniform-L4096": Run("uniform", heal=dict(seq_len=4096)),
    "uniform-r16": Run("uniform", heal=dict(lora_rank=16, lora_alpha=32)),  # the default's blocks, old rank
    "threshold-r16": Run("threshold", heal=dict(lora_rank=16, lora_alpha=32)),
    # the recipe before the study (LoRA rank 16, 512-token blocks), beside today's default
    "threshold-r16-L512": Run("threshold", heal=dict(lora_rank=16, lora_alpha=32, seq_len=0)),
    "uniform-r16-L512": Run("uniform", heal=dict(lora_rank=16, lora_alpha=32, seq_len=0)),
    "remove-r16-L512": Run("remove", heal=dict(lora_rank=16, lora_alpha=32, seq_len=0)),
    "uniform-L2048": Run("uniform", heal=dict(seq_len=2048, batch_size=8)),
    "uniform-w128-L4096": Run("uniform", spec=dict(window=128), heal=dict(seq_len=4096)),
    "threshold-w128-L4096": Run("threshold", spec=dict(window=128), heal=dict(seq_len=4096)),
}


def base_plans(table: SensitivityTable, lswa) -> dict[str, Plan]:
    pinned = (0, 1)
    return {"threshold": threshold_plan(table, 10, 10, lswa, pinned), "remove": remove_only_plan(table, 10, pinned),
            "uniform": uniform_plan(table.n_layers, lswa, pinned)}


def run_plan(run: Run, plans: dict[str, Plan]) -> Plan:
    return Plan(tuple(replace(s, **run.spec) if s.kind == "lswa" else s for s in plans[run.plan].layers))


def gap_closed(report: dict) -> float:
    t, b, a = (math.log(report[k]["heldout"]["perplexity"]) for k in ("teacher", "before", "after"))
    return (b - a) / (b - t) if b > t else float("nan")


def print_table(results: dict) -> None:
    print(f"\nheld-out: {results['heldout_tokens']} tokens of teacher text, {results['real_tokens']} tokens of "
          f"python-docs; device {results['device']}")
    print(f"{'run':22} {'S/L/N':>8} {'tokens':>6} {'KL bef':>6} {'KL aft':>6} {'ppl T':>5} "
          f"{'bef':>6} {'aft':>6} {'gap':>4} {'doc T':>6} {'bef':>6} {'aft':>6} {'tok/s':>6} {'s':>4}")
    for name, r in results["runs"].items():
        plan = Plan.parse(r["plan"])
        h = {k: r[k]["heldout"] for k in ("teacher", "before", "after")}
        d = [r[k].get("python-docs", {}).get("perplexity", float("nan")) for k in ("teacher", "before", "after")]
        print(f"{name:22} {plan.count('softmax'):>2}/{plan.count('lswa'):>2}/{plan.count('none'):>2} "
              f"{r['tokens'] / 1e6:5.1f}M {h['before']['kl']:6.3f} {h['after']['kl']:6.3f} "
              f"{h['teacher']['perplexity']:5.2f} {h['before']['perplexity']:6.2f} {h['after']['perplexity']:6.2f} "
              f"{r['gap_closed']:4.0%} {d[0]:6.2f} {d[1]:6.2f} {d[2]:6.2f} {r['tokens_per_s']:6.0f} "
              f"{r['seconds']:4.0f}")


def print_long_table(results: dict) -> None:
    """Real-text perplexity per span of context over the teacher's, per run (and per linear horizon)."""
    rows = [(name, "-", r["long_context"]["span_ppl"]) for name, r in results["runs"].items() if "long_context" in r]
    rows += [(name, h, spans) for name, r in results["runs"].items()
             for h, spans in r.get("long_context", {}).get("horizons", {}).items()]
    if not rows:
        return
    teacher = next(iter(results["runs"].values()))["teacher"]["long_context"]["span_ppl"]
    print("\nlong context: python-docs ppl per span (ratio to the teacher's)")
    print(f"{'run':22} {'horizon':>7} " + " ".join(f"{k:>16}" for k in teacher))
    print(f"{'teacher':22} {'-':>7} " + " ".join(f"{v:16.2f}" for v in teacher.values()))
    for name, h, spans in rows:
        print(f"{name:22} {h:>7} " + " ".join(f"{spans[k]:9.2f} ({spans[k] / teacher[k]:4.2f})" for k in teacher))


def mixture_entry(text: str) -> dict:
    """``source=weight[:option=value...]`` (weight 1 when left out) as a data.sources entry, e.g.
    ``teacher-unconditional=0.2:max_new_tokens=2048``; ValueError (one line) when the space would refuse it."""
    head, *options = text.split(":")
    source, _, weight = head.rpartition("=") if "=" in head else (head, "", "1")
    entry = {"source": source, "weight": weight}
    for option in options:
        key, eq, value = option.partition("=")
        if not eq:
            raise ValueError(f"--sources: {text!r}: {option!r} is not option=value")
        entry[key] = yaml.safe_load(value)
    try:
        return SourceConfig(**entry).model_dump(exclude_none=True)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(map(str, error["loc"])) or "options"
        raise ValueError(f"--sources: {text!r}: {where}: {error['msg']}") from None


def heal_run(ws: Workspace, name: str, plan: Plan, run: Run, args, teacher: dict) -> dict:
    """Before/after quality of one run; the teacher comes back exactly afterwards."""
    steps = run.transfer_steps
    library = ws.library if steps is None else ws.library_for(replace(ws.library.config, steps=steps))
    flags = {k: v for k, v in dict(batch_size=args.batch_size, lora_rank=args.lora_rank).items() if v is not None}
    cfg = ws.heal_config(args.tokens, **{**flags, **dict(lora_mlp=not args.no_lora_mlp, teacher=args.teacher,
                                                checkpoint_tokens=max(args.tokens // 2, 1),
                                                eval_tokens=args.eval_tokens), **run.heal})
    start = time.perf_counter()
    with ws.student(plan, library=library):
        before = ws.evaluate_assembled(plan)
    transfer_s = time.perf_counter() - start
    session = ws.student(plan, cfg, checkpoints=Path(args.work) / name, evaluator=cfg.eval_tokens > 0,
                         library=library, resume=False)
    with session:
        after = ws.evaluate()
        long = long_context(ws, args) if args.long_context else None
        if long and args.horizons:  # the same student with its linear part bounded (an evaluation option)
            long["horizons"] = {}
            for h in args.horizons:
                with linear_horizon(ws.model, h):
                    long["horizons"][str(h)] = long_context(ws, args)["span_ppl"]
    state = session.heal_state
    return {"plan": str(plan), "heal": asdict(cfg), "teacher": teacher, "before": {k: q.to_dict() for k, q in before.items()},
            "after": {k: q.to_dict() for k, q in after.items()}, "tokens": state.tokens, "seconds": state.seconds,
            "tokens_per_s": state.tokens / max(state.seconds, 1e-9), "transfer_seconds": transfer_s,
            "final_loss": state.losses[-1] if state.losses else None, "curve": state.evals,
            **({"long_context": long} if long else {})}


def long_context(ws: Workspace, args) -> dict:
    """Perplexity on held-out real text (python-docs) per span of predicted positions [0, L1), [L1, L2), ...
    of the model as it is now (``Workspace.long_context``)."""
    lengths = sorted(args.long_context)
    return {"lengths": lengths, "span_ppl": ws.long_context(tuple(lengths), args.long_tokens)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="alias, local dir or .gguf file (default: the space's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache", default=os.environ.get("LBSEARCH_CACHE"), help="cache folder (corpus, library)")
    p.add_argument("--corpus-tokens", type=int, default=2_500_000, help="healing corpus (GPU; teacher samples)")
    p.add_argument("--gen-batch", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=10_000_000)
    p.add_argument("--runs", nargs="+", default=["threshold", "uniform", "remove"], choices=list(RUNS))
    p.add_argument("--batch-size", type=int, help="blocks per step (default: the space's recipe on this device)")
    p.add_argument("--eval-tokens-heldout", type=int, help="held-out teacher and real text (default: the space's)")
    p.add_argument("--lora-rank", type=int, help="default: the space's recipe")
    p.add_argument("--no-lora-mlp", action="store_true")
    p.add_argument("--teacher", default="cached", choices=["auto", "cached", "online"],
                   help="teacher targets (cached: the setting of the recorded runs)")
    p.add_argument("--eval-tokens", type=int, default=0, help="held-out quality every this many tokens")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new run after this many seconds")
    p.add_argument("--seq-len", type=int, help="training and evaluation block length (default: the space's)")
    p.add_argument("--long-context", type=int, nargs="*", default=[],
                   help="also measure real-text perplexity per position span up to these lengths (e.g. 512 2048 4096)")
    p.add_argument("--long-tokens", type=int, default=65536, help="real-text tokens of the long-context set")
    p.add_argument("--horizons", type=int, nargs="*", default=[],
                   help="with --long-context: measure each healed student again with its LSWA linear part bounded "
                        "at these many keys (lbsearch.attention.lswa.linear_horizon), e.g. 512 1536")
    p.add_argument("--sources", nargs="+", metavar="SOURCE=WEIGHT[:OPTION=VALUE]",
                   help="the training mixture instead of the space's, e.g. teacher-prompts=0.6 "
                        "teacher-unconditional=0.2:max_new_tokens=2048 package-docs=0.2")
    p.add_argument("--tag", default="", help="suffix of the result file: bench_heal<tag>.json")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/bench_heal"), help="bench_heal.json goes here")
    p.add_argument("--work", default="runs/bench_heal_work", help="checkpoints")
    args = p.parse_args()
    if any(h < 1 for h in args.horizons):
        p.error(f"--horizons: {args.horizons}: each a whole number of keys >= 1")
    if args.horizons and not args.long_context:
        p.error("--horizons: measured on the long-context set only; give --long-context too (e.g. 512 2048 4096)")
    try:
        sources = [mixture_entry(s) for s in args.sources or ()]
    except ValueError as exc:
        p.error(str(exc))
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    space = load_space(None).on(args.device.split(":")[0])  # CPU-sized budgets on a CPU
    held = args.eval_tokens_heldout or space.budgets.eval_tokens
    data = {**space.data.model_dump(), "healing_corpus_tokens": args.corpus_tokens,
            "corpus_tokens": max(space.data.corpus_tokens, 4 * held), **({"seq_len": args.seq_len} if args.seq_len else {}),
            **({"sources": sources} if sources else {})}
    budgets = {**space.budgets.model_dump(), "eval_tokens": held}
    space = space.model_copy(update={"data": type(space.data)(**data), "budgets": type(space.budgets)(**budgets),
                                     "cpu": {}})
    ws = Workspace.open(space, device=args.device, cache=args.cache, model=args.model,
                        defaults={"generate_batch_size": args.gen_batch})
    print(f"workspace: {time.perf_counter() - t0:.0f} s", flush=True)
    t1 = time.perf_counter()
    ws.healing_blocks  # noqa: B018 - the healing corpus, timed on its own
    corpus_s = time.perf_counter() - t1
    print(f"healing corpus: {ws.healing_blocks.numel():,} tokens in {corpus_s:.0f} s", flush=True)
    plans = base_plans(SensitivityTable.load(TABLE), space.default_lswa())
    teacher = {k: q.to_dict() for k, q in ws.evaluate().items()}
    if args.long_context:
        teacher["long_context"] = long_context(ws, args)
    results = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               "train_tokens": ws.healing_blocks.numel(), "heldout_tokens": ws.heldout.blocks.numel(),
               "real_tokens": sum(e.blocks.numel() for e in ws.real_text.values()), "config": vars(args), "runs": {},
               "healing_corpus_s": corpus_s, "data_sources": ws.data_sources()}
    for name in args.runs:
        if time.perf_counter() - t0 > args.budget_s:
            print(f"skipping {name}: time budget", flush=True)
            continue
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        report = heal_run(ws, name, run_plan(RUNS[name], plans), RUNS[name], args, teacher)
        report["gap_closed"] = gap_closed(report)
        report["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
        results["runs"][name] = report
        (out / f"bench_heal{args.tag}.json").write_text(json.dumps(results, indent=1))
        h = {k: report[k]["heldout"]["perplexity"] for k in ("teacher", "before", "after")}
        print(f"{name}: ppl {h['before']:.2f} -> {h['after']:.2f} (teacher {h['teacher']:.2f}; "
              f"{report['tokens_per_s']:.0f} tok/s; {time.perf_counter() - t0:.0f} s elapsed)", flush=True)
    print_table(results)
    print_long_table(results)


if __name__ == "__main__":
    main()
