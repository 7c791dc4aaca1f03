"""Fidelity study: does a cheap trial fidelity rank plans like healing does?

For plans spanning the front (the paper's threshold plans for several budgets, remove-only,
uniform LSWA, random feasible plans of the default space) it scores each plan at ``assembled``,
at brief healing (0.25M and 1M tokens) and healed with 2M tokens, on held-out teacher text and on
held-out real text (python-docs), and reports the Spearman rank correlation of each cheap
fidelity against the 2M result and each fidelity's cost in seconds.

GPU (two parts of six plans, then merge; the cache folder carries the corpus and library over):
    python benchmarks/bench_fidelity.py --model /tmp/smol.gguf --cache /tmp/lbc --part 0 --out $OUT
    python benchmarks/bench_fidelity.py --model /tmp/smol.gguf --cache /tmp/lbc --part 1 --out $OUT
    python benchmarks/bench_fidelity.py --merge results/fidelity_part0.json results/fidelity_part1.json
CPU smoke run: --device cpu --budgets 512 1024 2048 --plans 4 --parts 1
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch

from lbsearch.attention import ORIGINAL
from lbsearch.objective import score
from lbsearch.plan import Plan
from lbsearch.sensitivity import SensitivityTable, remove_only_plan, threshold_plan, uniform_plan
from lbsearch.space import load_space
from lbsearch.workspace import Workspace

TABLE = Path(__file__).parent / "results" / "smollm2-135m_sensitivity.json"
THRESHOLDS = [(5, 5), (8, 10), (10, 10), (12, 14)]  # (n_none, n_lswa)


def random_plan(space, n_layers: int, rng: random.Random) -> Plan:
    """A uniformly random plan of the space that meets its constraints (rejection sampling)."""
    while True:
        plan = Plan(tuple(rng.choice(space.layer_specs(i)) for i in range(n_layers)))
        if not space.violations(plan):
            return plan


def study_plans(space, n_layers: int, n_plans: int, seed: int = 0) -> dict[str, Plan]:
    """Threshold plans, remove-only and uniform LSWA (when the sensitivity table fits the model),
    then random feasible plans up to ``n_plans``."""
    table = SensitivityTable.load(TABLE)
    pinned = tuple(i for i in range(n_layers) if space.allowed_kinds(i) == [ORIGINAL])
    lswa = space.default_lswa()
    plans = {}
    if table.n_layers == n_layers:
        plans = {f"threshold-{n}N-{m}L": threshold_plan(table, n, m, lswa, pinned) for n, m in THRESHOLDS}
        plans["remove-only-10N"] = remove_only_plan(table, 10, pinned)
        plans["uniform-lswa"] = uniform_plan(n_layers, lswa, pinned)
    rng = random.Random(seed)
    while len(plans) < n_plans:
        plans[f"random-{len(plans)}"] = random_plan(space, n_layers, rng)
    return plans


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return torch.tensor(r, dtype=torch.float64)

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = ra.norm() * rb.norm()
    return float((ra * rb).sum() / norm) if norm > 0 else float("nan")


METRICS = {"teacher KL": lambda r: r["kl"], "teacher ppl": lambda r: r["perplexity"],
           "real ppl": lambda r: r["real_text"]["python-docs"]["perplexity"],
           "real KL": lambda r: r["real_text"]["python-docs"]["kl"]}


def summarise(results: dict, reference: str) -> dict:
    """Spearman of every fidelity against ``reference`` per metric, and mean seconds per fidelity."""
    names = list(results)
    fids = list(next(iter(results.values())))
    out = {"spearman": {}, "seconds": {}}
    for f in fids:
        out["seconds"][f] = sum(results[n][f]["seconds"] for n in names) / len(names)
        if f != reference:
            out["spearman"][f] = {m: spearman([get(results[n][f]) for n in names],
                                              [get(results[n][reference]) for n in names])
                                  for m, get in METRICS.items()}
    return out


def print_table(results: dict, summary: dict, reference: str) -> None:
    fids = list(next(iter(results.values())))
    print(f"\n{'plan':22} {'S/L/N':>8} " + " ".join(f"{f + ' ppl/real':>20}" for f in fids))
    for name, by_f in results.items():
        c = next(iter(by_f.values()))["counts"]
        cells = " ".join(f"{by_f[f]['perplexity']:9.2f}/{METRICS['real ppl'](by_f[f]):9.2f}" for f in fids)
        print(f"{name:22} {c['softmax']:>2}/{c['lswa']:>2}/{c['none']:>2} {cells}")
    print(f"\nSpearman against {reference} (n={len(results)} plans); mean seconds per plan")
    print(f"{'fidelity':12} " + " ".join(f"{m:>12}" for m in METRICS) + f" {'seconds':>9}")
    for f in fids:
        rho = summary["spearman"].get(f)
        cells = " ".join(f"{rho[m]:12.3f}" if rho else f"{'-':>12}" for m in METRICS)
        print(f"{f:12} {cells} {summary['seconds'][f]:9.1f}")


def run_part(args) -> dict:
    start = time.perf_counter()
    space = load_space(args.space)
    data = {**space.data.model_dump(), "healing_corpus_tokens": args.corpus_tokens, "eval_sources": ["python-docs"],
            "corpus_tokens": max(space.data.corpus_tokens, 8 * args.eval_tokens)}  # a held-out split that large
    budgets = {**space.budgets.model_dump(), "eval_tokens": args.eval_tokens}
    space = space.model_copy(update={"data": type(space.data)(**data), "budgets": type(space.budgets)(**budgets)})
    transfer = {"steps": args.transfer_steps} if args.transfer_steps else None
    ws = Workspace.open(space, device=args.device, cache=args.cache, model=args.model, progress=False,
                        defaults={"generate_batch_size": args.gen_batch}, transfer=transfer)
    t0 = time.perf_counter()
    ws.healing_blocks  # noqa: B018 - generate (or load) the healing corpus before timing
    print(f"healing corpus: {ws.healing_blocks.numel()} tokens ({time.perf_counter() - t0:.0f} s)", flush=True)
    plans = list(study_plans(space, ws.n_layers, args.plans).items())
    per = -(-len(plans) // args.parts)
    mine = plans[slice(*args.slice)] if args.slice else plans[args.part * per:(args.part + 1) * per]
    t0 = time.perf_counter()
    for _, plan in mine:  # transfers first, so fidelity seconds are scoring time alone
        ws.ensure_blocks(plan)
    print(f"block library: {time.perf_counter() - t0:.0f} s", flush=True)
    small, mid, ref = args.budgets
    fidelities = {"assembled": ("assembled", None), f"brief-{small}": ("brief", small),
                  f"brief-{mid}": ("brief", mid), f"healed-{ref}": ("full", ref)}
    results = {}
    for name, plan in mine:
        if time.perf_counter() - start > args.budget_s:
            print(f"skipping {name}: time budget", flush=True)
            continue
        results[name] = {}
        for label, (fid, tokens) in fidelities.items():
            results[name][label] = score(ws, plan, fid, tokens).to_dict()
        r = results[name]
        print(f"{name}: ppl " + " -> ".join(f"{r[f]['perplexity']:.2f}" for f in fidelities)
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    return {"device": device, "config": vars(args), "results": results,
            "reference": f"healed-{ref}", "teacher": {k: q.to_dict() for k, q in ws.evaluate().items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="override the space's model (e.g. a local .gguf)")
    p.add_argument("--space", default=None, help="search space (default: the packaged smollm2-135m space)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache", default=os.environ.get("LBSEARCH_CACHE", "/tmp/lbc"))
    p.add_argument("--plans", type=int, default=12)
    p.add_argument("--parts", type=int, default=2)
    p.add_argument("--part", type=int, default=0)
    p.add_argument("--slice", type=int, nargs=2, metavar=("FROM", "TO"), help="plans FROM..TO-1 (instead of --part)")
    p.add_argument("--transfer-steps", type=int, default=None, help="per-layer transfer steps (default: the device's)")
    p.add_argument("--budgets", type=int, nargs=3, default=[250_000, 1_000_000, 2_000_000],
                   metavar=("BRIEF", "BRIEF2", "HEALED"))
    p.add_argument("--corpus-tokens", type=int, default=1_000_000, help="healing corpus (teacher samples)")
    p.add_argument("--gen-batch", type=int, default=2048)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new plan after this many seconds")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="combine part files and print the study")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/bench_fidelity"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        data = {**parts[0], "results": {k: v for part in parts for k, v in part["results"].items()}}
    else:
        data = run_part(args)
    data["summary"] = summarise(data["results"], data["reference"]) if len(data["results"]) > 2 else {}
    name = "fidelity.json" if args.merge else f"fidelity_part{args.part}.json"
    (out / name).write_text(json.dumps(data, indent=1))
    if data["summary"]:
        print_table(data["results"], data["summary"], data["reference"])


if __name__ == "__main__":
    main()
