"""Sensitivity analysis: hidden-state reuse vs a full forward per changed layer, side by side.

Usage: python benchmarks/bench_sensitivity.py [--tokens 2048] [--model smollm2-135m]
Prints a short table last; writes full results to $OUT/bench_sensitivity.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from lbsearch.data import load_corpus, pack_blocks, split_corpus
from lbsearch.evaluate import teacher_logits
from lbsearch.models import load_teacher, load_tokenizer
from lbsearch.plan import LayerSpec
from lbsearch.sensitivity import sensitivity, sensitivity_naive
from lbsearch.space import load_space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/bench"))
    args = parser.parse_args()
    space = load_space()
    ref = args.model or space.model
    model, tok = load_teacher(ref), load_tokenizer(ref)
    splits = split_corpus(load_corpus(space.data, model, tok), space.data)
    blocks = pack_blocks(splits["heldout"], tok, space.data.seq_len, max_tokens=args.tokens)
    teacher = teacher_logits(model, blocks)
    specs = {"lswa": space.default_lswa(), "none": LayerSpec(kind="none")}
    times, tables = {}, {}
    for name, fn in (("reuse", sensitivity), ("naive", sensitivity_naive)):
        start = time.perf_counter()
        tables[name] = fn(model, blocks, teacher, specs, progress=False)
        times[name] = time.perf_counter() - start
    diffs = {k: max(abs(a - b) / max(abs(b), 1e-12)
                    for a, b in zip(tables["reuse"].column(k), tables["naive"].column(k))) for k in specs}
    result = {"model": ref, "tokens": blocks.numel(), "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "seconds": times,
              "speedup": times["naive"] / times["reuse"], "max_rel_diff_kl": diffs,
              "reuse": tables["reuse"].to_dict(), "naive": tables["naive"].to_dict()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_sensitivity.json").write_text(json.dumps(result, indent=1))
    print(f"{'method':8} {'seconds':>9}")
    for name, sec in times.items():
        print(f"{name:8} {sec:9.1f}")
    print(f"speedup {result['speedup']:.2f}x on {blocks.numel()} tokens, 30 layers x 2 kinds; "
          f"max relative KL difference {max(diffs.values()):.2e}")


if __name__ == "__main__":
    main()
