"""Quality against the teacher: KL(teacher || student), perplexity, top-1 agreement.

The teacher's logits on held-out blocks are computed once and kept as top-k log-probabilities
(a safetensors cache), so evaluating a plan costs one student forward. KL uses the top-k tokens
plus one bucket for the rest of the vocabulary (exact when k equals the vocabulary).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load_file

from .data import blocks_hash
from .io import cache_dir, save_tensors, stable_hash

TOP_K = 128


@dataclass(frozen=True)
class TeacherLogits:
    """Teacher top-k log-probs [N, T, k] and their token ids, for ``blocks`` [N, T]."""

    logprobs: torch.Tensor
    ids: torch.Tensor

    def batch(self, sl: slice) -> "TeacherLogits":
        return TeacherLogits(self.logprobs[sl], self.ids[sl])


@dataclass(frozen=True)
class Quality:
    kl: float
    perplexity: float
    agreement: float
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def topk_of(logits: torch.Tensor, k: int = TOP_K) -> TeacherLogits:
    logprobs = torch.log_softmax(logits.float(), -1)
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return TeacherLogits(values, ids)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def teacher_logits(model, blocks: torch.Tensor, k: int = TOP_K, batch_size: int = 4,
                   model_key: str | None = None) -> TeacherLogits:
    """Top-k teacher log-probs for ``blocks``; cached on disk by ``model_key``, blocks and k
    (no cache without a key). A damaged cache file is recomputed."""
    path = None
    if model_key:
        path = cache_dir("teacher_logits") / f"{stable_hash(model_key, blocks_hash(blocks), k)}.safetensors"
        cached = _load_logits(path, blocks.shape)
        if cached is not None:
            return cached
    parts = []
    for i in range(0, len(blocks), batch_size):
        logits = model(blocks[i:i + batch_size].to(_device(model))).logits
        parts.append(topk_of(logits, k))
    out = TeacherLogits(torch.cat([p.logprobs.cpu() for p in parts]), torch.cat([p.ids.cpu() for p in parts]))
    if path is not None:
        save_tensors(path, {"logprobs": out.logprobs, "ids": out.ids.int()})
    return out


def _load_logits(path, shape) -> TeacherLogits | None:
    if not path.is_file():
        return None
    try:
        data = load_file(str(path))
        out = TeacherLogits(data["logprobs"], data["ids"].long())
    except Exception:  # noqa: BLE001 - any damage (truncated, garbage, wrong keys) means: recompute
        return None
    return out if tuple(out.logprobs.shape[:2]) == tuple(shape) else None


def kl_from_logprobs(logq: torch.Tensor, teacher: TeacherLogits) -> torch.Tensor:
    """KL(teacher || student) per position from student log-probs, over the teacher's top-k
    tokens plus one bucket for the rest of the vocabulary."""
    logp = teacher.logprobs.to(logq.device)
    logq_top = logq.gather(-1, teacher.ids.to(logq.device))
    kl = (logp.exp() * (logp - logq_top)).sum(-1)
    p_rest = (1 - logp.exp().sum(-1)).clamp_min(0)
    q_rest = (1 - logq_top.exp().sum(-1)).clamp_min(1e-12)
    rest = torch.where(p_rest > 0, p_rest * (torch.log(p_rest.clamp_min(1e-30)) - torch.log(q_rest)), 0.0)
    return kl + rest


def kl_per_token(student_logits: torch.Tensor, teacher: TeacherLogits) -> torch.Tensor:
    return kl_from_logprobs(torch.log_softmax(student_logits.float(), -1), teacher)


def quality_sums(student_logits: torch.Tensor, blocks: torch.Tensor, teacher: TeacherLogits) -> torch.Tensor:
    """[kl_sum, nll_sum, agree_sum, n_kl, n_nll] for one batch, to be added up over batches.

    One log-softmax serves KL, perplexity and agreement (the vocabulary pass dominates the cost).
    """
    logq = torch.log_softmax(student_logits.float(), -1)
    kl = kl_from_logprobs(logq, teacher)
    targets = blocks[:, 1:].to(logq.device)
    nll = -logq[:, :-1].gather(-1, targets[..., None]).sum()
    agree = (logq.argmax(-1).cpu() == teacher.ids[..., 0].cpu()).sum()
    return torch.tensor([kl.sum().item(), nll.item(), float(agree), kl.numel(), targets.numel()],
                        dtype=torch.float64)


def quality_from_sums(sums: torch.Tensor) -> Quality:
    kl_sum, nll_sum, agree_sum, n_kl, n_nll = sums.tolist()
    return Quality(kl=kl_sum / n_kl, perplexity=float(torch.exp(torch.tensor(nll_sum / n_nll))),
                   agreement=agree_sum / n_kl, tokens=int(n_kl))


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, teacher: TeacherLogits, batch_size: int = 4) -> Quality:
    """Quality of ``model`` (as it is now, plan applied or not) on ``blocks`` against the teacher."""
    sums = torch.zeros(5, dtype=torch.float64)
    for i in range(0, len(blocks), batch_size):
        sl = slice(i, i + batch_size)
        logits = model(blocks[sl].to(_device(model))).logits
        sums += quality_sums(logits, blocks[sl], teacher.batch(sl))
    return quality_from_sums(sums)


class PrefixStates:
    """The teacher's hidden states on fixed blocks at every ``every``-th layer input, so a plan
    that changes layers from ``f`` on is evaluated from the nearest stored layer at or before ``f``
    (layers before a change compute exactly what the teacher computes).

    ``every`` is the smallest stride whose states fit ``max_bytes``; computed on first use.
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int = 4, max_bytes: int = 2**30):
        self.blocks, self.batch_size, self.max_bytes = blocks, batch_size, max_bytes
        self.every = 1
        self.states: list[dict[int, torch.Tensor]] | None = None

    @torch.no_grad()
    def build(self, model) -> None:
        from .layers import hidden_states
        from .models import decoder_layers

        n_layers = len(decoder_layers(model))
        per_state = self.blocks.numel() * model.config.hidden_size * next(model.parameters()).element_size()
        self.every = max(1, -(-per_state * (n_layers + 1) // self.max_bytes))
        self.states = []
        for i in range(0, len(self.blocks), self.batch_size):
            states, _ = hidden_states(model, self.blocks[i:i + self.batch_size].to(_device(model)))
            self.states.append({j: s for j, s in enumerate(states) if j % self.every == 0})

    @torch.no_grad()
    def evaluate(self, model, teacher: TeacherLogits, first_changed: int) -> Quality:
        """Quality of ``model`` (plan applied) whose layers before ``first_changed`` are the teacher's."""
        from .layers import head, position_inputs, run_layers

        if self.states is None:
            raise RuntimeError("PrefixStates.build(teacher) first")
        start = first_changed - first_changed % self.every
        sums = torch.zeros(5, dtype=torch.float64)
        for b, states in enumerate(self.states):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            ids = self.blocks[sl].to(_device(model))
            hidden = run_layers(model, states[start], start, *position_inputs(model, ids))
            sums += quality_sums(head(model, hidden), self.blocks[sl], teacher.batch(sl))
        return quality_from_sums(sums)


@torch.no_grad()
def perplexity_by_position(model, blocks: torch.Tensor, edges: tuple[int, ...], batch_size: int = 1) -> list[float]:
    """Perplexity of ``model`` on the real next tokens of ``blocks`` [N, T], per span of predicted
    positions ``[edges[i], edges[i+1])``: whether quality drifts as the context grows (for LSWA the
    linear state's share of the normaliser grows with it). Spans past T are NaN."""
    if list(edges) != sorted(set(edges)) or edges[0] < 0:
        raise ValueError(f"edges must increase from >= 0, got {edges}")
    nll = torch.zeros(blocks.shape[1] - 1, dtype=torch.float64)
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i: i + batch_size].to(_device(model))
        logq = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
        nll += -logq.gather(-1, ids[:, 1:, None])[..., 0].sum(0).double().cpu()
    nll /= len(blocks)
    spans = zip(edges[:-1], edges[1:])
    return [float(torch.exp(nll[a:b].mean())) if a < len(nll) else float("nan") for a, b in spans]
