"""Search vs the paper's heuristic at equal predicted throughput, healed with one budget (matched pairs).

On the default space (LSWA windows from ``--windows``) the search runs ``--trials`` complete trials
at its ranking fidelity (``assembled``) with the sensitivity prior, as ``lbsearch search`` does.
For each heuristic plan (the paper's threshold plans for several budgets, remove-only, uniform
LSWA) the search's plan at equal predicted throughput is the study's plan of lowest KL among
those predicted at least as fast, other than the heuristic itself and the teacher. Both plans of
a pair are healed with the same budget (``--tokens``, the space's recipe) and measured on held-out
teacher text and held-out real text (python-docs).

Resumable across calls: the study lives in ``--cache`` and every healed result is written to
``<cache>/matched_state.json`` as it ends, so a second call (same cache) heals what is left.

GPU (two calls on one warm machine):
    python benchmarks/bench_matched.py --model /tmp/smol.gguf --cache /tmp/lbc --budget-s 480 --out $OUT
    python benchmarks/bench_matched.py --model /tmp/smol.gguf --cache /tmp/lbc --out $OUT
CPU smoke run: --device cpu --trials 6 --tokens 1024 --thresholds 4 4 --no-remove --no-uniform
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from lbsearch.attention import ORIGINAL
from lbsearch.executors.local import LocalExecutor
from lbsearch.io import atomic_write_json
from lbsearch.objective import score, serving
from lbsearch.plan import Plan
from lbsearch.search import SearchConfig, search
from lbsearch.search.store import load_study, sqlite_url
from lbsearch.sensitivity import SensitivityTable, remove_only_plan, threshold_plan, uniform_plan
from lbsearch.space import load_space
from lbsearch.workspace import Workspace

TABLE = Path(__file__).parent / "results" / "smollm2-135m_sensitivity.json"


def heuristic_plans(table: SensitivityTable, space, n_layers: int, args) -> dict[str, Plan]:
    pinned = tuple(i for i in range(n_layers) if space.allowed_kinds(i) == [ORIGINAL])
    lswa = space.default_lswa()
    pairs = list(zip(args.thresholds[::2], args.thresholds[1::2]))
    plans = {f"threshold-{n}N-{m}L": threshold_plan(table, n, m, lswa, pinned) for n, m in pairs}
    if not args.no_remove:
        plans[f"remove-only-{args.remove}N"] = remove_only_plan(table, args.remove, pinned)
    if not args.no_uniform:
        plans["uniform-lswa"] = uniform_plan(n_layers, lswa, pinned)
    return plans


def run_search(ws, table, args) -> list[dict]:
    """The search's complete trials: plan, origin, KL and predicted throughput ratio."""
    space = ws.space
    settings = space.search.model_copy(update={"trials": args.trials, "seed": args.seed, "rescore_top": 0})
    run_dir = Path(args.cache) / "matched_search"
    run_dir.mkdir(parents=True, exist_ok=True)
    config = SearchConfig(space=space.model_copy(update={"search": settings}), run_dir=run_dir, table=table,
                          resume=(run_dir / "optuna.db").exists(), progress=False)
    report = search(config, LocalExecutor(ws))
    study = load_study(sqlite_url(run_dir), report.study)
    names = list(study.user_attrs["objectives"])
    out = {}
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "COMPLETE" and "plan" in t.user_attrs:
            values = dict(zip(names, t.values))
            out[t.user_attrs["key"]] = {"trial": t.number, "plan": t.user_attrs["plan"],
                                        "origin": t.user_attrs.get("origin", ""), "kl": values["kl"],
                                        "throughput_ratio": values["throughput"]}
    return list(out.values())


def match(heuristic: Plan, speed: float, trials: list[dict], n_layers: int) -> dict | None:
    """The search's lowest-KL plan predicted at least as fast as ``heuristic`` (neither it nor the teacher)."""
    teacher = str(Plan.softmax(n_layers))
    pool = [t for t in trials if t["throughput_ratio"] >= speed and t["plan"] not in (str(heuristic), teacher)]
    return min(pool, key=lambda t: t["kl"]) if pool else None


def heal(ws, plan: Plan, tokens: int) -> dict:
    r = score(ws, plan, "full", tokens).to_dict()
    keep = ("plan", "kl", "perplexity", "agreement", "real_text", "throughput_ratio", "counts", "healing_tokens",
            "seconds")
    return {k: r[k] for k in keep}


def print_table(state: dict, teacher: dict) -> None:
    real = lambda r: r["real_text"]["python-docs"]  # noqa: E731
    print(f"\nteacher: ppl {teacher['heldout']['perplexity']:.2f}, real-text ppl "
          f"{teacher['python-docs']['perplexity']:.2f}; healed with {state['tokens']:,} tokens each")
    head = f"{'pair':22} {'who':9} {'S/L/N':>8} {'speed':>6} {'KL':>6} {'ppl':>6} {'real KL':>7} {'real ppl':>8}"
    print(head)
    for name, pair in state["pairs"].items():
        for who in ("heuristic", "search"):
            key = pair.get(who)
            r = state["healed"].get(key) if key else None
            if r is None:
                print(f"{name:22} {who:9} {'(not healed)':>8}")
                continue
            c = r["counts"]
            print(f"{name:22} {who:9} {c['softmax']:>2}/{c['lswa']:>2}/{c['none']:>2} {r['throughput_ratio']:6.3f} "
                  f"{r['kl']:6.3f} {r['perplexity']:6.2f} {real(r)['kl']:7.3f} {real(r)['perplexity']:8.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="override the space's model (e.g. a local .gguf)")
    p.add_argument("--space", default=None, help="search-space YAML (default: the packaged SmolLM2-135M space)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache", default=os.environ.get("LBSEARCH_CACHE", "/tmp/lbc"))
    p.add_argument("--windows", type=int, nargs="+", default=[64], help="LSWA windows of the space")
    p.add_argument("--trials", type=int, default=100, help="complete trials of the search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", type=int, default=2_000_000, help="healing budget of every plan")
    p.add_argument("--thresholds", type=int, nargs="+", default=[5, 5, 10, 10, 12, 14],
                   help="threshold plans: n_none n_lswa pairs")
    p.add_argument("--remove", type=int, default=10, help="layers removed by the remove-only plan")
    p.add_argument("--no-remove", action="store_true")
    p.add_argument("--no-uniform", action="store_true")
    p.add_argument("--table", default=str(TABLE), help="sensitivity table (heuristics and prior)")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new heal after this many seconds")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/bench_matched"))
    args = p.parse_args()
    if len(args.thresholds) % 2:
        p.error("--thresholds takes n_none n_lswa pairs")
    start = time.perf_counter()
    space = load_space(args.space)
    space = space.model_copy(update={
        "lswa": space.lswa.model_copy(update={"windows": args.windows}),
        "data": space.data.model_copy(update={"eval_sources": ["python-docs"]}),
        "budgets": space.budgets.model_copy(update={"eval_tokens": args.eval_tokens}),
        **({"model": args.model} if args.model else {})})  # the search reads the model's shape from the space
    ws = Workspace.open(space, device=args.device, cache=args.cache, model=args.model, progress=False)
    table = SensitivityTable.load(args.table)
    state_file = Path(args.cache) / "matched_state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if "pairs" not in state:
        t0 = time.perf_counter()
        trials = run_search(ws, table, args)
        state = {"command": "python " + shlex.join(sys.argv), "tokens": args.tokens, "trials": trials,
                 "search_s": time.perf_counter() - t0, "pairs": {}, "healed": {}, "plans": {}}
        for name, plan in heuristic_plans(table, ws.space, ws.n_layers, args).items():
            speed = serving(ws, plan)["throughput_ratio"]
            found = match(plan, speed, trials, ws.n_layers)
            state["plans"][plan.key] = str(plan)
            pair = {"heuristic": plan.key, "speed": speed, "search": None}
            if found:
                key = Plan.parse(found["plan"]).key
                state["plans"][key] = found["plan"]
                pair.update(search=key, search_trial=found["trial"], search_origin=found["origin"],
                            search_assembled_kl=found["kl"])
            state["pairs"][name] = pair
        atomic_write_json(state_file, state)
        print(f"search: {len(trials)} plans in {state['search_s']:.0f} s", flush=True)
    for name, pair in state["pairs"].items():
        for who in ("heuristic", "search"):
            key = pair.get(who)
            if key is None or key in state["healed"]:
                continue
            if time.perf_counter() - start > args.budget_s:
                print(f"time budget: {name} {who} left for the next call", flush=True)
                continue
            state["healed"][key] = heal(ws, Plan.parse(state["plans"][key]), args.tokens)
            atomic_write_json(state_file, state)
            r = state["healed"][key]
            print(f"{name} {who}: ppl {r['perplexity']:.2f}, real {r['real_text']['python-docs']['perplexity']:.2f} "
                  f"({r['seconds']:.0f} s)", flush=True)
    state["device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    state["teacher"] = {k: q.to_dict() for k, q in ws.evaluate().items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "matched.json", state)
    print_table(state, state["teacher"])


if __name__ == "__main__":
    main()
