"""``lbsearch heal``: per-layer transfer into the block library, then distillation from the teacher."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ..errors import LBSearchError
from ..recipe import HealConfig
from .common import Command, add_common, check_positive, early_plan, model_name, open_workspace, out_dir

# flag -> HealConfig field; a flag left out keeps the space's heal: section or the recipe default
FLAGS = {"batch_size": "batch_size", "grad_accum": "grad_accum", "lr": "lr", "lora_rank": "lora_rank", "lora_alpha": "lora_alpha",
         "tune": "tune", "full_lr": "full_lr", "seq_len": "seq_len",
         "teacher": "teacher", "temperature": "temperature", "ce_weight": "ce_weight",
         "attn_mse_weight": "attn_mse_weight", "checkpoint_tokens": "checkpoint_tokens", "eval_every": "eval_tokens"}


def add_args(p: argparse.ArgumentParser) -> None:
    add_common(p, "runs/<model>/heal-<plan key>")
    p.add_argument("--plan", required=True, help="plan string (e.g. SSL64N...) or plan file (.json/.yaml); "
                   "`lbsearch plan --threshold` prints the paper's plan from a sensitivity table")
    p.add_argument("--tokens", type=int, help="healing budget in tokens (default: budgets.healing_tokens; "
                   "on CPU the space's cpu: section sets a small one)")
    p.add_argument("--library", metavar="DIR", help="block library folder (default: in the cache)")
    p.add_argument("--corpus-tokens", type=int, help="heal on a separate corpus of this many tokens from the data sources "
                   "(default: data.healing_corpus_tokens on GPU; on CPU the corpus's train split)")
    p.add_argument("--transfer-steps", type=int,
                   help="per-layer transfer steps for missing blocks (default 300 on GPU, 50 on CPU)")
    p.add_argument("--seq-len", type=int, help="training block length in tokens (default: the space's heal: "
                   "section, packaged 2048 on GPU; else data.seq_len); held-out quality stays at data.seq_len")
    p.add_argument("--batch-size", type=int, help="blocks per micro-batch (default 32 on GPU, 1 on CPU, "
                   "fewer for blocks longer than data.seq_len: as many tokens a step)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, help="learning rate of the new attention parameters (default 1e-3)")
    p.add_argument("--lora-rank", type=int, help="LoRA rank on the projections (default: the space's heal: "
                   "section, packaged 64; else 16; 0: none)")
    p.add_argument("--lora-alpha", type=int, help="LoRA alpha: adapters scaled by alpha / rank (default: the "
                   "space's, packaged 128; else 32)")
    p.add_argument("--no-lora-mlp", action="store_true",
                   help="LoRA (or full tuning) on the attention projections only")
    p.add_argument("--tune", choices=["lora", "full"],
                   help="train LoRA adapters on the projections (default) or the projections' weights themselves")
    p.add_argument("--full-lr", type=float, help="learning rate of fully tuned weights (--tune full; default 5e-5)")
    p.add_argument("--teacher", choices=["auto", "cached", "online"],
                   help="teacher targets: every step (online), top-k once per block (cached), or cached "
                        "when the budget repeats blocks (auto, the default)")
    p.add_argument("--temperature", type=float, help="distillation temperature (default 1)")
    p.add_argument("--ce-weight", type=float, help="weight of cross-entropy on the data (default 0)")
    p.add_argument("--attn-mse-weight", type=float, help="weight of per-layer attention-output MSE (default 0)")
    p.add_argument("--checkpoint-tokens", type=int, help="checkpoint every N tokens (default 1M)")
    p.add_argument("--eval-every", type=int, metavar="TOKENS", help="held-out quality every N tokens (default: off)")
    p.add_argument("--no-resume", action="store_true", help="discard existing checkpoints in --out and start over")
    p.add_argument("--long-context", type=int, nargs="+", metavar="L",
                   help="also report perplexity on held-out real text per span of context, [0, L1), [L1, L2), ... "
                        "(e.g. 512 2048 4096), teacher and healed: whether the plan drifts with the context")
    p.add_argument("--long-tokens", type=int, help="real-text tokens of the long-context set (default: 8 blocks "
                   "of the longest length)")


def run(args) -> None:
    from ..export import save_healed

    check_positive(args, "tokens", "transfer_steps", "batch_size", "grad_accum", "checkpoint_tokens", "corpus_tokens",
                   "seq_len", "long_tokens")
    if args.long_context and min(args.long_context) <= 0:
        raise LBSearchError(f"--long-context {' '.join(map(str, args.long_context))}: lengths must be positive")
    plan = early_plan(args, args.plan)  # bad plans and recipes fail here, before the teacher loads
    overrides = {field: getattr(args, flag) for flag, field in FLAGS.items() if getattr(args, flag) is not None}
    if args.no_lora_mlp:
        overrides["lora_mlp"] = False
    HealConfig(**overrides)
    out = out_dir(args, Path("runs") / model_name(args) / f"heal-{plan.key}")
    transfer = {"steps": args.transfer_steps} if args.transfer_steps else None
    corpus = {"healing_corpus_tokens": args.corpus_tokens} if args.corpus_tokens else None
    ws = open_workspace(args, library=args.library, transfer=transfer, defaults=corpus)
    plan = ws.parse_plan(args.plan, args.plan)
    if ws.defaults.healing_corpus_tokens:
        print(f"healing corpus: {ws.defaults.healing_corpus_tokens} tokens from the data sources "
              f"(seed {ws.space.data.seed + 1}, train-split prompts and documents only; samples cached)", flush=True)
    cfg = ws.heal_config(args.tokens, **overrides)
    if args.no_resume:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    teacher = ws.evaluate()
    lengths = tuple(args.long_context or ())
    long_tokens = args.long_tokens or 8 * max(lengths, default=0)
    long = {"teacher": ws.long_context(lengths, long_tokens)} if lengths else {}
    with ws.student(plan) as _:
        before = ws.evaluate_assembled(plan)
    session = ws.student(plan, cfg, checkpoints=out, evaluator=cfg.eval_tokens > 0)
    with session as model:
        after = ws.evaluate()
        if lengths:
            long["after"] = ws.long_context(lengths, long_tokens)
        state = session.heal_state
        report = {"plan": str(plan), "config_tokens": cfg.tokens, "tokens": state.tokens, "seconds": state.seconds,
                  "tokens_per_s": state.tokens / max(state.seconds, 1e-9), "curve": state.evals,
                  "final_loss": state.losses[-1] if state.losses else None, "data_sources": ws.data_sources(),
                  **{name: {k: q[name].to_dict() for k, q in (("teacher", teacher), ("before", before),
                                                               ("after", after))} for name in teacher},
                  **({"long_context": long} if long else {})}
        save_healed(model, plan, cfg, out / "healed", report)
    counts = ", ".join(f"{plan.count(k)} {k}" for k in ("softmax", "lswa", "none"))
    print(f"plan {plan} ({counts})")
    for name in teacher:
        print(f"\n{name}: {'':2} {'KL':>8} {'ppl':>9} {'agree':>7}")
        for row, q in (("teacher", teacher), ("before", before), ("after", after)):
            print(f"  {row:8} {q[name].kl:8.4f} {q[name].perplexity:9.3f} {q[name].agreement:7.3f}")
    if long:
        print_long_context(long, ws.space.data.eval_sources[0])
    print(f"\nhealed on {state.tokens} tokens in {state.seconds:.1f} s ({report['tokens_per_s']:.0f} tok/s)")
    print(f"wrote healed model: {out / 'healed'} (load with lbsearch.export.load_healed)")
    print(f"block library: {ws.library.root}")


def print_long_context(long: dict, source: str) -> None:
    spans = list(long["teacher"])
    print(f"\n{source}, perplexity by context span:\n  {'':8}" + "".join(f"{s:>13}" for s in spans))
    for row in ("teacher", "after"):
        print(f"  {row:8}" + "".join(f"{long[row][s]:13.3f}" for s in spans))
    print(f"  {'ratio':8}" + "".join(f"{long['after'][s] / long['teacher'][s]:12.2f}x" for s in spans))


COMMAND = Command(name="heal", help="heal a plan: per-layer transfer into the block library, then distillation "
                  "from the teacher", add_args=add_args, run=run)
