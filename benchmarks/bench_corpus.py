"""Healing-corpus generation time: ``lbsearch.data.teacher_corpus`` as the Workspace calls it on a GPU.

The Workspace's ``healing_blocks`` calls ``teacher_corpus(teacher, tokenizer, healing_corpus_tokens,
seed=data.seed + 1, batch_size=generate_batch_size, model_key=key)`` with the teacher loaded in float32
on the device (defaults on a GPU: 2.5M tokens, batch 512). This script makes that call, timed, into an
empty cache folder (so it samples; the teacher's safetensors copy is made before the clock starts).
Each repeat uses its own empty corpus folder and the next seed; the first repeat is the cold one (the
engine's kernels compile and its CUDA graph is captured inside it), as in a fresh Workspace process.
The engine sampler is wrapped to count the answer tokens and time each batch. A float32 teacher on CUDA
samples from a bfloat16 copy (``data.generation_dtype``; the copy is made inside the timed call).

    python benchmarks/bench_corpus.py --model /tmp/smol.gguf --tokens 2500000 --batch 512 --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=2_500_000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--seed", type=int, default=1, help="data.seed + 1, as healing_blocks passes it")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default="runs/bench_corpus")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lbsearch-corpus-"))
    os.environ.setdefault("LBSEARCH_CACHE", str(root / "cache"))

    from lbsearch import data, load_teacher, load_tokenizer
    from lbsearch.models import model_key

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher, tokenizer = load_teacher(args.model, dtype=dtype, device=device), load_tokenizer(args.model)
    key = model_key(args.model)
    load_s = time.perf_counter() - t0

    batches: list[dict] = []
    make_sampler = data._engine_sampler

    def counting_sampler(*a, **kw):
        sample = make_sampler(*a, **kw)

        def run(prompts, seed):
            start = time.perf_counter()
            answers = sample(prompts, seed)
            batches.append({"seconds": time.perf_counter() - start, "rows": len(answers),
                            "tokens": sum(map(len, answers)), "longest": max(map(len, answers))})
            return answers

        return run

    data._engine_sampler = counting_sampler
    rows = []
    for r in range(args.repeats):
        os.environ["LBSEARCH_CACHE"] = str(root / f"cache-{r}")  # corpora land here: always sampled anew
        batches.clear()
        start = time.perf_counter()
        ds = data.teacher_corpus(teacher, tokenizer, args.tokens, seed=args.seed + r, batch_size=args.batch,
                                 model_key=key)
        seconds = time.perf_counter() - start
        tokens = sum(b["tokens"] for b in batches)
        row = {"repeat": r, "seed": args.seed + r, "seconds": seconds, "answer_tokens": tokens,
               "tokens_per_s": tokens / seconds, "documents": len(ds), "batches": len(batches),
               "sampling_seconds": sum(b["seconds"] for b in batches),
               "first_batch_s": batches[0]["seconds"] if batches else None,
               "median_batch_s": sorted(b["seconds"] for b in batches)[len(batches) // 2] if batches else None,
               "mean_answer": tokens / max(1, sum(b["rows"] for b in batches)),
               "batch_log": list(batches)}
        rows.append(row)
        print(f"repeat {r}: {tokens:,} answer tokens in {seconds:.1f} s ({tokens / seconds:,.0f} tok/s), "
              f"{len(batches)} batches (first {row['first_batch_s']:.1f} s, median {row['median_batch_s']:.2f} s), "
              f"mean answer {row['mean_answer']:.0f}, {len(ds)} documents", flush=True)
    from lbsearch import sampling

    meta = {"model": args.model, "model_key": key, "device": device,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "dtype": args.dtype,
            "generation_dtype": str(data.generation_dtype(teacher)).removeprefix("torch."),
            "top_p_candidates": sampling.CANDIDATES,
            "tokens": args.tokens, "batch": args.batch, "sampling": data.SAMPLING, "load_seconds": load_s,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out / 'corpus.json'}")


if __name__ == "__main__":
    main()
