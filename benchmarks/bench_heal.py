"""Heal SmolLM2-135M: threshold plan, remove-only and uniform lswa side by side, plus ablations.

GPU:  python benchmarks/bench_heal.py --model /tmp/smol.gguf --tokens 10000000 --runs threshold remove uniform
      python benchmarks/bench_heal.py --model /tmp/smol.gguf --tokens 2000000 --runs uniform-s0 threshold-no-lora
CPU:  python benchmarks/bench_heal.py --device cpu --corpus space --tokens 16384 --runs threshold
Plans: threshold = the paper's heuristic on the measured sensitivity table (10 none, 10 lswa,
layers 0-1 pinned softmax); remove = the same 10 layers removed, the rest softmax; uniform = every
layer lswa but 0 and 1. A run is a plan plus changes (LSWA spec, transfer, healing config); see
RUNS. Quality is measured on held-out teacher text and on real technical English (Python
standard-library docstrings, read with ``ast``). Full reports go to $OUT/bench_heal.json; a short
table is printed last.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sysconfig
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lbsearch.data import blocks_hash, pack_blocks, sample_teacher_texts
from lbsearch.distill import BlockLibrary, HealConfig, TransferConfig, heal_plan
from lbsearch.evaluate import teacher_logits
from lbsearch.models import load_teacher, load_tokenizer
from lbsearch.plan import LayerSpec, Plan
from lbsearch.sensitivity import SensitivityTable, threshold_plan

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
}


def base_plans(table: SensitivityTable) -> dict[str, Plan]:
    thr = threshold_plan(table, n_none=10, n_lswa=10, pinned=(0, 1))
    remove = Plan(tuple(s if s.kind == "none" else LayerSpec(kind="softmax") for s in thr.layers))
    uniform = Plan.uniform(table.n_layers, table.specs["lswa"]).with_layer(0, LayerSpec(kind="softmax"))
    return {"threshold": thr, "remove": remove, "uniform": uniform.with_layer(1, LayerSpec(kind="softmax"))}


def run_plan(run: Run, plans: dict[str, Plan]) -> Plan:
    return Plan(tuple(replace(s, **run.spec) if s.kind == "lswa" else s for s in plans[run.plan].layers))


def stdlib_text(n_chars: int) -> str:
    """Docstrings of the Python standard library (sorted files, parsed, never imported)."""
    root, parts, total = Path(sysconfig.get_paths()["stdlib"]), [], 0
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and (doc := ast.get_docstring(node)):
                if len(doc) > 200:
                    parts.append(doc)
                    total += len(doc)
        if total >= n_chars:
            break
    return "\n\n".join(parts)


def corpus_blocks(args, model, tok) -> tuple[torch.Tensor, float]:
    """Training/held-out blocks: loaded from --corpus-file when it exists, else generated (and saved)."""
    path = Path(args.corpus_file) if args.corpus_file else None
    if path and path.is_file():
        return load_file(str(path))["blocks"].long(), 0.0
    start = time.perf_counter()
    if args.corpus == "space":  # the cached default corpus (CPU runs)
        from lbsearch.data import load_corpus
        from lbsearch.space import load_space

        texts = list(load_corpus(load_space().data, model, tok)["text"])
    else:  # rounds with new seeds until the size or the time limit is reached
        texts, n, seed = [], 0, 0
        while n < args.corpus_tokens and time.perf_counter() - start < args.corpus_seconds:
            new = sample_teacher_texts(model, tok, min(args.corpus_tokens - n, 400_000), seed=seed,
                                       max_new_tokens=256, batch_size=args.gen_batch, progress=False)
            texts += new
            n += sum(len(tok(t)["input_ids"]) for t in new)
            seed += 1
            print(f"corpus: {n} tokens after {time.perf_counter() - start:.0f} s", flush=True)
    blocks = pack_blocks(texts, tok, args.seq_len)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"blocks": blocks.to(torch.int32).contiguous()}, str(path))
    return blocks, time.perf_counter() - start


def gap_closed(report: dict) -> float:
    t, b, a = (math.log(report[k]["perplexity"]) for k in ("teacher", "before", "after"))
    return (b - a) / (b - t) if b > t else float("nan")


def print_table(results: dict) -> None:
    print(f"\nheld-out: {results['heldout_tokens']} tokens of teacher text, {results['stdlib_tokens']} tokens of "
          f"stdlib docstrings; device {results['device']}")
    print(f"{'run':22} {'S/L/N':>8} {'tokens':>6} {'xfer':>5} {'KL bef':>6} {'KL aft':>6} {'ppl T':>5} "
          f"{'bef':>6} {'aft':>6} {'gap':>4} {'doc T':>6} {'bef':>6} {'aft':>6} {'tok/s':>6} {'s':>4}")
    for name, r in results["runs"].items():
        plan = Plan.parse(r["plan"])
        err = r["transfer_rel_error"]["mean"] if r["transfer_rel_error"] else float("nan")
        doc = r["extra"].get("stdlib", {})
        d = [doc[k]["perplexity"] if doc else float("nan") for k in ("teacher", "before", "after")]
        print(f"{name:22} {plan.count('softmax'):>2}/{plan.count('lswa'):>2}/{plan.count('none'):>2} "
              f"{r['tokens'] / 1e6:5.1f}M {err:5.3f} {r['before']['kl']:6.3f} {r['after']['kl']:6.3f} "
              f"{r['teacher']['perplexity']:5.2f} {r['before']['perplexity']:6.2f} {r['after']['perplexity']:6.2f} "
              f"{r['gap_closed']:4.0%} {d[0]:6.2f} {d[1]:6.2f} {d[2]:6.2f} {r['tokens_per_s']:6.0f} "
              f"{r['seconds']:4.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="alias, local dir or .gguf file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--corpus", choices=["generate", "space"], default="generate")
    p.add_argument("--corpus-file", help="token blocks (safetensors): read if present, else written")
    p.add_argument("--corpus-tokens", type=int, default=3_000_000)
    p.add_argument("--corpus-seconds", type=float, default=150.0, help="stop generating after this long")
    p.add_argument("--gen-batch", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=10_000_000)
    p.add_argument("--runs", nargs="+", default=["threshold", "uniform", "remove"], choices=list(RUNS))
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--heldout-blocks", type=int, default=64)
    p.add_argument("--stdlib-blocks", type=int, default=32, help="blocks of docstring text (0: none)")
    p.add_argument("--calibration-blocks", type=int, default=32)
    p.add_argument("--transfer-steps", type=int, default=TransferConfig().steps)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--no-lora-mlp", action="store_true")
    p.add_argument("--teacher", default="cached", choices=["auto", "cached", "online"],
                   help="teacher targets (cached: the setting of the recorded runs)")
    p.add_argument("--eval-tokens", type=int, default=0, help="held-out quality every this many tokens")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new run after this many seconds")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/bench_heal"), help="bench_heal.json goes here")
    p.add_argument("--work", default="runs/bench_heal_work", help="block library, checkpoints, healed models")
    args = p.parse_args()
    t0 = time.perf_counter()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_teacher(args.model, device=args.device), load_tokenizer(args.model)
    blocks, gen_s = corpus_blocks(args, model, tok)
    print(f"corpus: {blocks.numel()} tokens ({gen_s:.0f} s); {time.perf_counter() - t0:.0f} s elapsed", flush=True)
    held, cal = args.heldout_blocks, args.calibration_blocks
    heldout, calibration, train = blocks[-held:], blocks[-held - cal:-held], blocks[:-held - cal]
    teacher = teacher_logits(model, heldout, use_cache=False)
    extra = {}
    if args.stdlib_blocks:
        docs = pack_blocks([stdlib_text(args.stdlib_blocks * args.seq_len * 6)], tok, args.seq_len)
        docs = docs[:args.stdlib_blocks]
        extra["stdlib"] = (docs, teacher_logits(model, docs, use_cache=False))
    plans = base_plans(SensitivityTable.load(TABLE))
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "corpus_tokens": blocks.numel(), "train_tokens": train.numel(), "generate_seconds": gen_s,
               "heldout_tokens": heldout.numel(), "stdlib_tokens": extra["stdlib"][0].numel() if extra else 0,
               "config": vars(args), "runs": {}}
    for name in args.runs:
        if time.perf_counter() - t0 > args.budget_s:
            print(f"skipping {name}: time budget", flush=True)
            continue
        run = RUNS[name]
        steps = args.transfer_steps if run.transfer_steps is None else run.transfer_steps
        library = BlockLibrary(work / "library", model.lbsearch_key, blocks_hash(calibration),
                               TransferConfig(steps=steps))
        cfg = HealConfig(**{**dict(tokens=args.tokens, batch_size=args.batch_size, lora_rank=args.lora_rank,
                                   lora_mlp=not args.no_lora_mlp, checkpoint_tokens=max(args.tokens // 2, 1),
                                   eval_tokens=args.eval_tokens, teacher=args.teacher), **run.heal})
        fresh = load_teacher(args.model, device=args.device)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        report = heal_plan(fresh, run_plan(run, plans), library, calibration, train, heldout, teacher, cfg,
                           work / name, resume=False, extra_heldout=extra)
        report["gap_closed"] = gap_closed(report)
        report["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
        results["runs"][name] = report
        (out / "bench_heal.json").write_text(json.dumps(results, indent=1))
        print(f"{name}: ppl {report['before']['perplexity']:.2f} -> {report['after']['perplexity']:.2f} "
              f"(teacher {report['teacher']['perplexity']:.2f}; {report['tokens_per_s']:.0f} tok/s; "
              f"{time.perf_counter() - t0:.0f} s elapsed)", flush=True)
        del fresh
    print_table(results)


if __name__ == "__main__":
    main()
