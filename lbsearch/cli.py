"""The ``lbsearch`` command line. Each command is a small function registered in COMMANDS."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

from .errors import LBSearchError

COMMANDS: dict[str, tuple[Callable, Callable, str]] = {}
CPU_TRANSFER_STEPS = 50  # per-layer transfer on a CPU: about 10 s a layer for SmolLM2-135M


def command(name: str, help_text: str):
    """Register ``fn(args)`` with an ``add_args(parser)`` defined as ``fn.add_args``."""

    def wrap(fn):
        COMMANDS[name] = (fn, getattr(fn, "add_args", lambda p: None), help_text)
        return fn

    return wrap


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--space", metavar="FILE", help="search-space YAML (default: the packaged smollm2-135m space)")
    parser.add_argument("--model", metavar="REF", help="override the space's model: registry alias, local HF dir or hub id")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: runs/<model>/<command>)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _out_dir(args, model_ref: str, command_name: str) -> Path:
    out = Path(args.out) if args.out else Path("runs") / Path(model_ref).name / command_name
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_context(args):
    """Space, teacher, tokenizer and held-out blocks as the arguments ask."""
    from .data import load_corpus, pack_blocks, split_corpus
    from .models import load_teacher, load_tokenizer
    from .space import load_space

    space = load_space(args.space)
    ref = args.model or space.model
    model = load_teacher(ref, device=_device(args.device))
    tokenizer = load_tokenizer(ref)
    space.check_layers(model.config.num_hidden_layers, args.space or "space")
    splits = split_corpus(load_corpus(space.data, model, tokenizer), space.data)
    return space, ref, model, tokenizer, splits


def open_library(args, model, tokenizer, splits, space):
    """The block library named by ``--library`` (default: in the cache), keyed by the calibration data."""
    from .data import blocks_hash, pack_blocks
    from .distill import BlockLibrary, TransferConfig
    from .io import cache_dir

    calibration = pack_blocks(splits["calibration"], tokenizer, space.data.seq_len,
                              max_tokens=space.budgets.calibration_tokens)
    root = Path(args.library) if getattr(args, "library", None) else cache_dir("libraries", model.lbsearch_key)
    default_steps = TransferConfig().steps if next(model.parameters()).is_cuda else CPU_TRANSFER_STEPS
    config = TransferConfig(steps=getattr(args, "transfer_steps", None) or default_steps)
    return BlockLibrary(root, model.lbsearch_key, blocks_hash(calibration), config), calibration


def cmd_sensitivity(args) -> None:
    from .data import pack_blocks
    from .evaluate import teacher_logits
    from .plan import LayerSpec
    from .sensitivity import sensitivity, sensitivity_naive

    space, ref, model, tokenizer, splits = load_context(args)
    tokens = args.tokens or space.budgets.sensitivity_tokens
    blocks = pack_blocks(splits["heldout"], tokenizer, space.data.seq_len, max_tokens=tokens)
    teacher = teacher_logits(model, blocks)
    specs = {"lswa": space.default_lswa(), "none": LayerSpec(kind="none")}
    libraries = {}
    if args.library:
        library, calibration = open_library(args, model, tokenizer, splits, space)
        library.ensure(model, [(i, specs["lswa"]) for i in range(model.config.num_hidden_layers)], calibration)
        specs["lswa_trained"] = specs["lswa"]
        libraries["lswa_trained"] = library
    start = time.perf_counter()
    table = (sensitivity_naive if args.naive else sensitivity)(model, blocks, teacher, specs, libraries=libraries)
    elapsed = time.perf_counter() - start
    print(table.render())
    paths = table.save(_out_dir(args, ref, "sensitivity"))
    print(f"sensitivity of {len(table.rows['lswa'])} layers x {len(specs)} kinds on {blocks.numel()} tokens "
          f"in {elapsed:.1f} s")
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")


def _sensitivity_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--tokens", type=int, help="held-out tokens (default: budgets.sensitivity_tokens)")
    p.add_argument("--naive", action="store_true", help="full forward per changed layer (the slow reference)")
    p.add_argument("--library", metavar="DIR", help="block library: add an lswa_trained column with trained blocks "
                   "(missing blocks are trained first)")
    p.add_argument("--transfer-steps", type=int,
                   help="per-layer transfer steps for missing blocks (default 300 on GPU, 50 on CPU)")


cmd_sensitivity.add_args = _sensitivity_args
command("sensitivity", "per-layer quality drop for lswa and none (table, CSV/JSON, heatmap)")(cmd_sensitivity)


def healing_texts(args, space, model, tokenizer, splits, on_gpu: bool):
    """What healing trains on: a separate teacher corpus (GPU default, or --corpus-tokens), else the train split."""
    from .data import teacher_corpus

    n = args.corpus_tokens if args.corpus_tokens is not None else (
        space.data.healing_corpus_tokens if on_gpu and space.data.source == "teacher" else 0)
    if not n:
        return splits["train"]
    if space.data.source != "teacher":
        raise LBSearchError(f"--corpus-tokens needs data.source 'teacher' (the space has {space.data.source!r})")
    print(f"healing corpus: {n} tokens sampled from the teacher (seed {space.data.seed + 1}; cached)")
    return teacher_corpus(model, tokenizer, n, seed=space.data.seed + 1, batch_size=512 if on_gpu else 16)


def cmd_heal(args) -> None:
    from .data import pack_blocks
    from .distill import HealConfig, heal_plan
    from .evaluate import teacher_logits
    from .plan import resolve_plan

    space, ref, model, tokenizer, splits = load_context(args)
    plan = resolve_plan(args.plan, space.lswa_defaults).check(model.config.num_hidden_layers, args.plan)
    on_gpu = next(model.parameters()).is_cuda
    tokens = args.tokens or (space.budgets.healing_tokens if on_gpu else space.budgets.healing_tokens_cpu)
    seq = space.data.seq_len
    train = pack_blocks(healing_texts(args, space, model, tokenizer, splits, on_gpu), tokenizer, seq)
    heldout = pack_blocks(splits["heldout"], tokenizer, seq, max_tokens=space.budgets.eval_tokens)
    library, calibration = open_library(args, model, tokenizer, splits, space)
    batch_size = args.batch_size or (32 if on_gpu else 4)
    cfg = HealConfig(tokens=tokens, batch_size=batch_size, grad_accum=args.grad_accum, lr=args.lr,
                     teacher=args.teacher, lora_rank=args.lora_rank, lora_mlp=not args.no_lora_mlp,
                     checkpoint_tokens=args.checkpoint_tokens, temperature=args.temperature,
                     ce_weight=args.ce_weight, attn_mse_weight=args.attn_mse_weight)
    out = _out_dir(args, ref, f"heal-{plan.key}")
    report = heal_plan(model, plan, library, calibration, train, heldout, teacher_logits(model, heldout), cfg, out,
                       resume=not args.no_resume)
    print(f"plan {plan} ({plan.count('softmax')} softmax, {plan.count('lswa')} lswa, {plan.count('none')} none)")
    print(f"{'':8} {'KL':>8} {'ppl':>9} {'agree':>7}")
    for name in ("teacher", "before", "after"):
        q = report[name]
        print(f"{name:8} {q['kl']:8.4f} {q['perplexity']:9.3f} {q['agreement']:7.3f}")
    print(f"healed on {report['tokens']} tokens in {report['seconds']:.1f} s ({report['tokens_per_s']:.0f} tok/s)")
    print(f"wrote healed model: {out / 'healed'} (load with lbsearch.distill.load_healed)")
    print(f"block library: {library.root}")


def _heal_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--plan", required=True, help="plan string (e.g. SSL64N...) or plan file (.json/.yaml)")
    p.add_argument("--tokens", type=int, help="healing budget in tokens (default: budgets.healing_tokens on GPU, "
                   "budgets.healing_tokens_cpu on CPU)")
    p.add_argument("--library", metavar="DIR", help="block library folder (default: in the cache)")
    p.add_argument("--corpus-tokens", type=int, help="heal on a separate teacher corpus of this many tokens "
                   "(default: data.healing_corpus_tokens on GPU; on CPU the corpus's train split)")
    p.add_argument("--transfer-steps", type=int,
                   help="per-layer transfer steps for missing blocks (default 300 on GPU, 50 on CPU)")
    p.add_argument("--batch-size", type=int, help="blocks per micro-batch (default 32 on GPU, 4 on CPU)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the LSWA parameters")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank on the projections (0: none)")
    p.add_argument("--no-lora-mlp", action="store_true", help="LoRA on the attention projections only")
    p.add_argument("--teacher", choices=["auto", "cached", "online"], default="auto",
                   help="teacher targets: every step (online), top-k once per block (cached), or cached "
                        "when the budget repeats blocks (auto)")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    p.add_argument("--ce-weight", type=float, default=0.0, help="weight of cross-entropy on the data")
    p.add_argument("--attn-mse-weight", type=float, default=0.0, help="weight of per-layer attention-output MSE")
    p.add_argument("--checkpoint-tokens", type=int, default=1_000_000, help="checkpoint every N tokens")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in --out")


cmd_heal.add_args = _heal_args
command("heal", "heal a plan: per-layer transfer into the block library, then distillation from the teacher")(cmd_heal)


def _bench_model(args):
    """(name, model) for bench: a built-in shape or the teacher, with random weights when asked."""
    import torch

    from .bench import SHAPES, random_model

    device = _device(args.device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if args.shape:
        if args.shape not in SHAPES:
            raise LBSearchError(f"--shape {args.shape!r}: choose from {', '.join(SHAPES)}")
        return args.shape, random_model(args.shape, dtype, device)
    from .models import load_teacher
    from .space import load_space

    ref = args.model or load_space(args.space).model
    model = load_teacher(ref, dtype=dtype, device=device)
    if args.random_weights:
        model = random_model(model.config, dtype, device)
    return ref, model


def cmd_bench(args) -> None:
    from .bench import bandwidth_floor, calibrate_from_rows, model_shape, render, sweep, write_results
    from .cost import measure_machine
    from .plan import resolve_plan

    if min(args.concurrency) < 1 or args.prompt_len < 1 or args.output_len < 2:
        raise LBSearchError("--concurrency, --prompt-len must be >= 1 and --output-len >= 2")
    name, model = _bench_model(args)
    shape = model_shape(model)
    plans = [resolve_plan(p).check(shape.layers, p) for p in args.plans or []]
    budget = int(args.memory_budget * 2**30) if args.memory_budget else None
    rows, tables = sweep(model, plans, args.concurrency, args.prompt_len, args.output_len,
                         repeats=args.repeats, budget_bytes=budget)
    bw = measure_machine(str(model.lm_head.weight.device)).bandwidth
    rows += [bandwidth_floor(shape, b, args.prompt_len, args.output_len, bw) for b in args.concurrency]
    if args.calibrate:
        for batch, table in calibrate_from_rows(tables, rows).items():
            print(f"calibrated cost table (batch {batch}): {table.notes['path']}")
    print(render(rows))
    meta = {"model": name, "device": tables[args.concurrency[0]].device, "prompt_len": args.prompt_len,
            "output_len": args.output_len, "cost_source": {b: t.source for b, t in tables.items()},
            "title": f"{Path(name).name}: prompt {args.prompt_len}, output {args.output_len}"}
    for kind, path in write_results(_out_dir(args, name, "bench"), "bench", rows, meta).items():
        print(f"wrote {kind}: {path}")


def _bench_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--plans", nargs="+", metavar="PLAN", help="plan strings or files (the base is always included)")
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 50, 100, 200], metavar="N")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="decode repeats (median)")
    p.add_argument("--memory-budget", type=float, metavar="GB", help="for max concurrency (default: device memory)")
    p.add_argument("--calibrate", action="store_true", help="refit the cost model to these measurements")
    p.add_argument("--random-weights", action="store_true", help="benchmark the model's shape with random weights")
    p.add_argument("--shape", metavar="NAME", help="a built-in shape with random weights: llama-3.2-1b, smollm2-135m")


cmd_bench.add_args = _bench_args
command("bench", "decode throughput of plans vs the base at several concurrencies (table, CSV/JSON, plot)")(cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lbsearch", description="Choose softmax, linear sliding-window (LSWA) or no attention per layer of an "
        "LLM: sensitivity analysis, healing, serving benchmark.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (fn, add_args, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        args.func(args)
    except LBSearchError as exc:
        print(f"lbsearch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lbsearch: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
