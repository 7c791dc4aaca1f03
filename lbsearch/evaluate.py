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
                   use_cache: bool = True) -> TeacherLogits:
    """Top-k teacher log-probs for ``blocks``; cached on disk by model, blocks and k."""
    key = stable_hash(getattr(model, "lbsearch_key", None), blocks_hash(blocks), k)
    path = cache_dir("teacher_logits") / f"{key}.safetensors"
    if use_cache and getattr(model, "lbsearch_key", None) and path.is_file():
        data = load_file(str(path))
        return TeacherLogits(data["logprobs"], data["ids"].long())
    parts = []
    for i in range(0, len(blocks), batch_size):
        logits = model(blocks[i:i + batch_size].to(_device(model))).logits
        parts.append(topk_of(logits, k))
    out = TeacherLogits(torch.cat([p.logprobs.cpu() for p in parts]), torch.cat([p.ids.cpu() for p in parts]))
    if use_cache and getattr(model, "lbsearch_key", None):
        save_tensors(path, {"logprobs": out.logprobs, "ids": out.ids.int()})
    return out


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
