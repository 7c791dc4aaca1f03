"""Closed-loop request benchmark: N slots of the decode engine, each refilled with the next request
when its sequence ends, as serving benchmarks run at a fixed concurrency.

Requests have random prompts and prompt / output lengths drawn (seeded) from a distribution
around given means; a request runs to its output length (EOS ignored, as serving benchmarks do).
A freed slot takes the next request at once (its arrival time); the slots freed by one step are
prefilled together while the other rows keep their caches, then every row decodes on. Reported:
generated tokens/s, time to first token (arrival to the end of its prefill) and time per output
token (first token to last, per later token), p50 and p99.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    output_len: int


# name -> (rng, mean, spread, n) -> n lengths around ``mean`` (rounded and clipped to 1..4*mean after)
LENGTHS = {
    "fixed": lambda rng, mean, spread, n: np.full(n, mean),
    "uniform": lambda rng, mean, spread, n: rng.uniform(mean * (1 - spread), mean * (1 + spread), n),
    "lognormal": lambda rng, mean, spread, n: rng.lognormal(np.log(mean) - spread**2 / 2, spread, n),
}


def draw_requests(n: int, prompt_len: int, output_len: int, vocab: int, distribution: str = "uniform",
                  spread: float = 0.5, seed: int = 0) -> list[Request]:
    """``n`` requests with random prompts; lengths from ``LENGTHS[distribution]`` with means
    ``prompt_len`` / ``output_len`` (``spread``: the half-width as a fraction of the mean for
    uniform, sigma for lognormal)."""
    if distribution not in LENGTHS:
        raise ValueError(f"unknown length distribution {distribution!r}; choose from {', '.join(LENGTHS)}")
    rng = np.random.default_rng(seed)

    def lengths(mean: int) -> np.ndarray:
        return np.clip(np.rint(LENGTHS[distribution](rng, mean, spread, n)), 1, 4 * mean).astype(int)

    prompts, outputs = lengths(prompt_len), lengths(output_len)
    return [Request(tuple(rng.integers(0, vocab, p).tolist()), int(o)) for p, o in zip(prompts, outputs)]


def engine_length(requests: list[Request]) -> int:
    """The engine ``max_len`` that fits every request."""
    return max(len(r.prompt) + r.output_len for r in requests)


@dataclass
class _Slot:
    index: int  # the request's number
    request: Request
    arrival: float
    first: float
    produced: int = 1  # prefill picks the first token


def run_requests(engine, requests: list[Request], clock=time.perf_counter) -> tuple[list[dict], float]:
    """Serve ``requests`` in order through the engine's rows: (one record per request, wall seconds).

    A record: index, prompt_len, output_len, ttft_s, tpot_s (None for one-token outputs), tokens.
    """
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    queue, slots, records = deque(enumerate(requests)), {}, []
    engine.configure()  # greedy, no EOS stop

    def admit(rows: list[int], now: float) -> None:
        taken = [(row, *queue.popleft()) for row in rows[: len(queue)]]
        if taken:
            engine.prefill([r.prompt for _, _, r in taken], rows=[row for row, _, _ in taken])
            sync()
            first = clock()
            slots.update({row: _Slot(i, r, now, first) for row, i, r in taken})
        engine.park(rows[len(taken):])

    def retire(now: float) -> list[int]:
        ended = [row for row, s in slots.items() if s.produced == s.request.output_len]
        for row in ended:
            s = slots.pop(row)
            out = s.request.output_len
            records.append({"index": s.index, "prompt_len": len(s.request.prompt), "output_len": out,
                            "ttft_s": s.first - s.arrival, "tpot_s": (now - s.first) / (out - 1) if out > 1 else None,
                            "tokens": engine.new_tokens(row, out)})
        return ended

    start = now = clock()
    admit(list(range(engine.batch)), now)
    while slots:
        ended = retire(now)
        if ended:
            admit(ended, now)
            now = clock()
            continue
        engine.decode(1)
        sync()
        now = clock()
        for s in slots.values():
            s.produced += 1
    return sorted(records, key=lambda r: r["index"]), now - start


def summarize(records: list[dict], wall: float) -> dict:
    """Throughput and latency percentiles of a run (times in ms)."""
    ttft = np.array([r["ttft_s"] for r in records]) * 1000
    tpot = np.array([r["tpot_s"] for r in records if r["tpot_s"] is not None] or [np.nan]) * 1000
    generated = sum(r["output_len"] for r in records)
    return {"requests": len(records), "wall_s": wall, "throughput_tps": generated / wall,
            "req_per_s": len(records) / wall,
            "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p99_ms": float(np.percentile(ttft, 99)),
            "tpot_p50_ms": float(np.percentile(tpot, 50)), "tpot_p99_ms": float(np.percentile(tpot, 99)),
            "mean_prompt": float(np.mean([r["prompt_len"] for r in records])),
            "mean_output": generated / len(records)}
