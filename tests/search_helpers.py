"""Shared by the search tests: fake sensitivity tables, spy and fake executors, small spaces."""
from __future__ import annotations

from collections import deque

from lbsearch.evaluate import Quality
from lbsearch.executors.base import Executor, Job, Outcome
from lbsearch.objective import TrialResult
from lbsearch.plan import LayerSpec, Plan
from lbsearch.sensitivity import SensitivityTable


def fake_table(kl_lswa: list[float], kl_none: list[float], lswa: LayerSpec | None = None) -> SensitivityTable:
    q = lambda kl: Quality(kl=kl, perplexity=1.0 + kl, agreement=1.0, tokens=1)  # noqa: E731
    return SensitivityTable(model="fake", tokens=1, base=q(0.0),
                            specs={"lswa": lswa or LayerSpec.lswa(window=8, feature_dim=16),
                                   "none": LayerSpec(kind="none")},
                            rows={"lswa": [q(v) for v in kl_lswa], "none": [q(v) for v in kl_none]})


class SpyExecutor(Executor):
    """Wraps an executor; records every job it is given."""

    def __init__(self, inner: Executor):
        self.inner, self.jobs = inner, []
        self.slots = inner.slots

    @property
    def workspace(self):
        return self.inner.workspace

    def submit(self, job: Job) -> None:
        self.jobs.append(job)
        self.inner.submit(job)

    def wait(self, timeout=None):
        return self.inner.wait(timeout)

    def pending(self) -> int:
        return self.inner.pending()


class FakeExecutor(Executor):
    """Scores plans without a model: KL grows with removed and linear layers (a little less at higher
    fidelities), speed with removed layers; ``slots`` jobs at a time; records the peak of pending jobs."""

    def __init__(self, slots: int = 1, fail: set[str] = frozenset()):
        self.slots, self.fail = slots, set(fail)
        self.queue, self.jobs, self.peak = deque(), [], 0

    def submit(self, job: Job) -> None:
        self.jobs.append(job)
        self.queue.append(job)
        self.peak = max(self.peak, len(self.queue))

    def pending(self) -> int:
        return len(self.queue)

    def wait(self, timeout=None):
        out = []
        while self.queue:
            job = self.queue.popleft()
            if job.plan in self.fail:
                out.append(Outcome(job=job, error="RuntimeError: boom", worker="fake"))
            else:
                out.append(Outcome(job=job, result=fake_result(Plan.parse(job.plan), job.fidelity), worker="fake"))
        return out


def fake_result(plan: Plan, fidelity: str = "assembled") -> TrialResult:
    n_none, n_lswa = plan.count("none"), plan.count("lswa")
    depth = sum((i + 1) * (s.kind != "softmax") for i, s in enumerate(plan.layers))  # later layers cost less
    kl = (0.3 * n_none + 0.05 * n_lswa) * (1 + 0.01 * depth) * (0.5 if fidelity != "assembled" else 1.0)
    return TrialResult(plan=str(plan), key=plan.key, fidelity=fidelity, kl=kl, perplexity=10 * (1 + kl),
                       agreement=1 / (1 + kl), eval_tokens=64, throughput_ratio=1 + 0.4 * n_none + 0.05 * n_lswa,
                       tokens_per_s=100.0, kv_bytes_per_seq=2**20 * (len(plan) - n_none - n_lswa) + 1000,
                       max_concurrency=10, cost_source="analytic", counts={"softmax": plan.count("softmax"),
                                                                           "lswa": n_lswa, "none": n_none})
