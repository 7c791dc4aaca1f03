"""Healing-corpus generation time: ``lbsearch.corpus.build_corpus`` as the Workspace calls it on a GPU.

The Workspace's ``healing_blocks`` draws the space's mixture (``data.sources``; the packaged space:
teacher answers to the broad prompt set 0.8, unconditional samples 0.2) at ``healing_corpus_tokens``
with ``seed=data.seed + 1``, train-split prompts only, ``batch_size=generate_batch_size``, the teacher
loaded in float32 on the device (defaults on a GPU: 2.5M tokens, batch 512). This script makes that
call, timed, into an empty cache folder (so it samples; the teacher's safetensors copy is made before
the clock starts). Each repeat uses its own empty corpus folder and the next seed; the first repeat is
the cold one (the engine's kernels compile and its CUDA graph is captured inside it), as in a fresh
Workspace process. The engine sampler is wrapped to count the sampled tokens and time each batch, per
source. A float32 teacher on CUDA samples from a bfloat16 copy (``generation_dtype``; made inside the
timed call). ``--sources answers`` times the teacher-prompts source alone.

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
    p.add_argument("--space", help="search space YAML whose data.sources are drawn (default: the packaged one)")
    p.add_argument("--sources", choices=("space", "answers"), default="space",
                   help="the space's mixture, or teacher answers to the broad prompts alone")
    p.add_argument("--tokens", type=int, default=2_500_000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--seed", type=int, default=1, help="data.seed + 1, as healing_blocks passes it")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default="runs/bench_corpus")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lbsearch-corpus-"))
    os.environ.setdefault("LBSEARCH_CACHE", str(root / "cache"))

    from lbsearch import load_teacher, load_tokenizer
    from lbsearch.corpus import teacher as sampler_module
    from lbsearch.data import build_corpus, generation_dtype
    from lbsearch.models import model_key
    from lbsearch.space import load_space

    data = load_space(args.space).data
    if args.sources == "answers":
        data = data.model_copy(update={"sources": [type(data.mixture[0])(source="teacher-prompts")], "source": None})
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher, tokenizer = load_teacher(args.model, dtype=dtype, device=device), load_tokenizer(args.model)
    key = model_key(args.model)
    load_s = time.perf_counter() - t0

    batches: list[dict] = []
    make_sampler = sampler_module._engine_sampler

    def counting_sampler(*a, **kw):
        sample = make_sampler(*a, **kw)
        settings = kw.get("sampling")

        def run(prompts, seed):
            start = time.perf_counter()
            answers = sample(prompts, seed)
            batches.append({"seconds": time.perf_counter() - start, "rows": len(answers), "sampling": settings,
                            "prompt_len": max(map(len, prompts)), "tokens": sum(map(len, answers)),
                            "longest": max(map(len, answers))})
            return answers

        return run

    sampler_module._engine_sampler = counting_sampler
    rows = []
    for r in range(args.repeats):
        os.environ["LBSEARCH_CACHE"] = str(root / f"cache-{r}")  # corpora land here: always sampled anew
        batches.clear()
        start = time.perf_counter()
        corpus = build_corpus(data, teacher, tokenizer, model_key=key, batch_size=args.batch, n_tokens=args.tokens,
                              seed=args.seed + r, train_only=True)
        seconds = time.perf_counter() - start
        tokens = sum(b["tokens"] for b in batches)
        row = {"repeat": r, "seed": args.seed + r, "seconds": seconds, "sampled_tokens": tokens,
               "tokens_per_s": tokens / seconds, "documents": len(corpus.dataset), "batches": len(batches),
               "sources": [s.to_dict() for s in corpus.sources],
               "sampling_seconds": sum(b["seconds"] for b in batches),
               "first_batch_s": batches[0]["seconds"] if batches else None,
               "median_batch_s": sorted(b["seconds"] for b in batches)[len(batches) // 2] if batches else None,
               "mean_answer": tokens / max(1, sum(b["rows"] for b in batches)),
               "batch_log": list(batches)}
        rows.append(row)
        shares = ", ".join(f"{s.kind} {s.tokens:,}" for s in corpus.sources)
        print(f"repeat {r}: {tokens:,} sampled tokens in {seconds:.1f} s ({tokens / seconds:,.0f} tok/s; {shares}), "
              f"{len(batches)} batches (first {row['first_batch_s']:.1f} s, median {row['median_batch_s']:.2f} s), "
              f"mean sample {row['mean_answer']:.0f}, {len(corpus.dataset)} documents", flush=True)
    from lbsearch import sampling

    meta = {"model": args.model, "model_key": key, "device": device,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "dtype": args.dtype,
            "generation_dtype": str(generation_dtype(teacher)).removeprefix("torch."),
            "top_p_candidates": getattr(sampling, "CANDIDATES", None),
            "tokens": args.tokens, "batch": args.batch, "data": data.model_dump(mode="json"),
            "load_seconds": load_s, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out / 'corpus.json'}")


if __name__ == "__main__":
    main()
