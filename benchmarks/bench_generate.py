"""Teacher-corpus generation speed: HF ``generate()`` against the decode engine, on the default teacher.

Both sample the chat-templated seed prompts (different lengths, left-padded in one batch) with
``lbsearch.data.SAMPLING``, through the same functions ``sample_teacher_texts`` uses. Two runs each:
``corpus`` (every answer stops at its EOS, as the corpus does: tokens/s counts the answers' tokens)
and ``fixed`` (no EOS: exactly ``--new-tokens`` per row, the throughput of full rows).

    python benchmarks/bench_generate.py --batch 64 --new-tokens 128 --out runs/bench_generate
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lbsearch import load_teacher, load_tokenizer
from lbsearch.data import SEED_PROMPTS, _engine_sampler, _hf_sampler


def chat_prompts(tokenizer, batch: int) -> list[list[int]]:
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in SEED_PROMPTS]
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in chats]
    return [ids[i % len(ids)] for i in range(batch)]


def timed(sample, prompts, seed: int) -> dict:
    """Wall and process CPU seconds (the CPU time is the steadier number on a shared machine)."""
    start, cpu = time.perf_counter(), time.process_time()
    answers = sample(prompts, seed)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    tokens = sum(map(len, answers))
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "tokens_per_cpu_s": tokens / cpu_seconds, "mean_answer": tokens / len(answers)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="teacher dtype (auto: bfloat16 on CUDA, float32 on CPU; the Workspace loads float32)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--runs", nargs="+", choices=("corpus", "fixed"), default=["corpus", "fixed"])
    p.add_argument("--out", default="runs/bench_generate")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    model, tokenizer = load_teacher(args.model, dtype=dtype, device=args.device), load_tokenizer(args.model)
    prompts = chat_prompts(tokenizer, args.batch)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = [tokenizer.eos_token_id]
    rows = []
    for run, stop in [(r, eos if r == "corpus" else []) for r in args.runs]:
        model.generation_config.eos_token_id = stop or None
        samplers = {"hf-generate": _hf_sampler(model, args.new_tokens, pad, stop),
                    "engine": _engine_sampler(model, args.batch, max(map(len, prompts)) + args.new_tokens,
                                              args.new_tokens, pad, stop)}
        for name, sample in samplers.items():
            sample(prompts[:2], 99)  # warm-up
            row = {"run": run, "sampler": name, **timed(sample, prompts, 0)}
            rows.append(row)
            print(f"{run:7s} {name:12s} {row['tokens_per_s']:8.1f} tok/s  {row['tokens_per_cpu_s']:8.1f} tok/cpu-s  "
                  f"({row['tokens']} tokens in {row['seconds']:.1f} s, {row['cpu_seconds']:.1f} cpu-s, "
                  f"mean answer {row['mean_answer']:.0f})", flush=True)
    meta = {"model": args.model, "device": args.device, "dtype": str(dtype).removeprefix("torch."),
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "batch": args.batch, "new_tokens": args.new_tokens,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generate.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out / 'generate.json'}")


if __name__ == "__main__":
    main()
