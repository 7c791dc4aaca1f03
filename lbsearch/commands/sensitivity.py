"""``lbsearch sensitivity``: per-layer quality drop for lswa and none (table, CSV/JSON, heatmap)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import LBSearchError
from .common import Command, add_common, check_positive, model_name, open_workspace, out_dir


def add_args(p: argparse.ArgumentParser) -> None:
    add_common(p, "runs/<model>/sensitivity")
    p.add_argument("--tokens", type=int, help="held-out tokens (default: budgets.sensitivity_tokens)")
    p.add_argument("--naive", action="store_true", help="full forward per changed layer (the slow reference)")
    p.add_argument("--library", metavar="DIR", help="block library: add an lswa_trained column with trained blocks "
                   "(missing blocks are trained first; default folder: in the cache)")
    p.add_argument("--transfer-steps", type=int,
                   help="per-layer transfer steps for missing blocks (default 300 on GPU, 50 on CPU)")


def run(args) -> None:
    from ..evaluate import teacher_logits
    from ..plan import LayerSpec
    from ..sensitivity import sensitivity, sensitivity_naive

    check_positive(args, "tokens", "transfer_steps")
    out = out_dir(args, Path("runs") / model_name(args) / "sensitivity")
    transfer = {"steps": args.transfer_steps} if args.transfer_steps else None
    ws = open_workspace(args, library=args.library, transfer=transfer)
    tokens = args.tokens or ws.space.budgets.sensitivity_tokens
    seq = ws.space.data.seq_len
    blocks = ws.blocks["heldout"][: max(1, tokens // seq)]
    if blocks.numel() < tokens and args.tokens:
        raise LBSearchError(f"--tokens {tokens}: only {blocks.numel()} held-out tokens "
                            "(raise budgets.eval_tokens or data.corpus_tokens)")
    teacher = teacher_logits(ws.model, blocks, model_key=ws.key)
    specs = {"lswa": ws.space.default_lswa(), "none": LayerSpec(kind="none")}
    libraries = {}
    if args.library:
        ws.library.ensure(ws.model, [(i, specs["lswa"]) for i in range(ws.n_layers)], ws.blocks["calibration"])
        specs["lswa_trained"] = specs["lswa"]
        libraries["lswa_trained"] = ws.library
    start = time.perf_counter()
    fn = sensitivity_naive if args.naive else sensitivity
    table = fn(ws.model, blocks, teacher, specs, libraries=libraries, model_name=ws.space.model)
    elapsed = time.perf_counter() - start
    print(table.render())
    print(f"sensitivity of {ws.n_layers} layers x {len(specs)} kinds on {blocks.numel()} tokens in {elapsed:.1f} s")
    for kind, path in table.save(out).items():
        print(f"wrote {kind}: {path}")


COMMAND = Command(name="sensitivity", help="per-layer quality drop for lswa and none (table, CSV/JSON, heatmap)",
                  add_args=add_args, run=run)
