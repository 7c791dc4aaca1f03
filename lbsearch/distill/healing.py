"""Global healing: distil the modified model from the teacher (the same model with the plan and
the tuning switched off), training the new LSWA parameters and LoRA adapters or, with
``tune="full"``, the projections' weights themselves (:mod:`lbsearch.distill.tuning`).

The teacher's targets are either computed every step ("online", full vocabulary) or once per
training block as top-k log-probabilities ("cached"). When the budget passes over the data more
than once, the cache removes the repeated teacher forwards; "auto" picks it exactly then.

Resumable: every ``checkpoint_tokens`` the trainable tensors, the optimizer state and the step go
to disk atomically; the data order and learning rate are pure functions of the step, so a resumed
run ends with the same parameters as an uninterrupted one.
"""
from __future__ import annotations

import math
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..errors import LBSearchError
from ..evaluate import TeacherLogits, kl_from_logprobs, topk_of
from ..surgery import SurgeryHandle, trainable_modules
from ..recipe import HealConfig
from .checkpoints import Checkpoints, HealState
from .tuning import fully_tuned, teacher_weights, tuner_layers


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    """New LSWA parameters, LoRA weights and fully tuned weights, by name; everything else frozen."""
    model.requires_grad_(False)
    train = fully_tuned(model)
    for module in trainable_modules(model).values():
        train.update(id(p) for p in module.new_parameters().values())
    params = {}
    for name, p in model.named_parameters():
        if id(p) in train or "lora_" in name:
            p.requires_grad_(True)
            params[name] = p
    return params


class teacher_mode:
    """Context: the plan suspended, adapters off and fully tuned weights swapped for their originals,
    so the model is exactly the teacher."""

    def __init__(self, model, handle: SurgeryHandle):
        self.model, self.handle = model, handle

    def __enter__(self):
        self._suspend, self._weights = self.handle.suspended(), teacher_weights(self.model)
        self._suspend.__enter__()
        self._weights.__enter__()
        for m in tuner_layers(self.model):
            m.enable_adapters(False)
        return self.model

    def __exit__(self, *exc):
        for m in tuner_layers(self.model):
            m.enable_adapters(True)
        self._weights.__exit__(*exc)
        self._suspend.__exit__(*exc)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor | TeacherLogits, temperature: float) -> torch.Tensor:
    """Mean per-token KL(teacher || student) at ``temperature``, scaled by temperature^2.

    ``teacher``: full logits, or cached top-k log-probs (already at the temperature), in which
    case the rest of the vocabulary is one bucket.
    """
    s = torch.log_softmax(student.float() / temperature, -1)
    if isinstance(teacher, TeacherLogits):
        kl = kl_from_logprobs(s, teacher)
    else:
        t = torch.log_softmax(teacher.float() / temperature, -1)
        kl = (t.exp() * (t - s)).sum(-1)
    return kl.mean() * temperature ** 2


def lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@lru_cache(maxsize=4)
def _epoch_order(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def batch_indices(step: int, micro: int, n_blocks: int, batch_size: int, grad_accum: int, seed: int) -> torch.Tensor:
    """Blocks of a micro-batch: a seeded permutation per epoch, a pure function of the step."""
    first = (step * grad_accum + micro) * batch_size
    return torch.stack([_epoch_order(n_blocks, seed, pos // n_blocks)[pos % n_blocks]
                        for pos in range(first, first + batch_size)])


def blocks_used(total_steps: int, n_blocks: int, cfg: HealConfig) -> torch.Tensor:
    """Sorted indices of every block a run of ``total_steps`` reads."""
    positions = total_steps * cfg.grad_accum * cfg.batch_size
    if positions >= n_blocks:
        return torch.arange(n_blocks)
    return _epoch_order(n_blocks, cfg.seed, 0)[:positions].sort().values


class TeacherCache:
    """Teacher top-k log-probs for the blocks a run reads, computed up front in a fixed order (so a
    resumed run sees bit-identical targets). Kept on the training device when it fits easily."""

    def __init__(self, blocks: torch.Tensor, used: torch.Tensor, targets: Callable, cfg: HealConfig,
                 device: torch.device, progress: bool = True):
        self.logprobs = self.ids = None
        for start in tqdm(range(0, len(used), cfg.batch_size), desc="teacher top-k", unit="batch",
                          disable=not progress):
            sel = used[start:start + cfg.batch_size]
            top = targets(blocks[sel])
            if self.logprobs is None:  # k is known now: the vocabulary may be smaller than top_k
                self._allocate(blocks.shape, top.ids.shape[-1], device)
            sel = sel.to(self.logprobs.device)
            self.logprobs[sel] = top.logprobs.to(self.logprobs.device)
            self.ids[sel] = top.ids.to(self.ids.device, torch.int32)

    def _allocate(self, shape: torch.Size, k: int, device: torch.device) -> None:
        n, t = shape
        if device.type == "cuda" and n * t * k * 8 > 0.25 * torch.cuda.mem_get_info(device)[0]:
            device = torch.device("cpu")
        self.logprobs = torch.zeros(n, t, k, device=device)
        self.ids = torch.zeros(n, t, k, dtype=torch.int32, device=device)

    def get(self, idx: torch.Tensor, device: torch.device) -> TeacherLogits:
        sel = idx.to(self.logprobs.device)
        return TeacherLogits(self.logprobs[sel].to(device, non_blocking=True),
                             self.ids[sel].to(device, torch.long, non_blocking=True))


class AttnOutputs:
    """Collects attention outputs of the LSWA layers (student) and of their originals (teacher)."""

    def __init__(self, model, handle: SurgeryHandle):
        self.student, self.teacher, self.hooks = {}, {}, []
        for idx, module in trainable_modules(model).items():
            self.hooks.append(module.register_forward_hook(self._save(self.student, idx)))
            self.hooks.append(handle.originals[idx].register_forward_hook(self._save(self.teacher, idx)))

    @staticmethod
    def _save(store, idx):
        return lambda m, args, out: store.__setitem__(idx, out[0])

    def loss(self) -> torch.Tensor:
        terms = [(self.student[i].float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-12)
                 for i, t in self.teacher.items()]
        return torch.stack(terms).mean()

    def close(self):
        for h in self.hooks:
            h.remove()


def param_groups(params: dict[str, torch.nn.Parameter], full: set[int], cfg: HealConfig) -> list[dict]:
    """AdamW groups, each at its own learning rate: new attention parameters, LoRA, fully tuned weights."""
    kinds = {"new": [], "lora": [], "full": []}
    for name, p in params.items():
        kinds["full" if id(p) in full else "lora" if "lora_" in name else "new"].append(p)
    lrs = {"new": cfg.lr, "lora": cfg.lora_lr, "full": cfg.full_lr}
    return [{"params": kinds[k], "lr": lrs[k], "base_lr": lrs[k]} for k in kinds if kinds[k] or k == "new"]


class HealStep:
    """One optimizer step: teacher targets, student forward, loss, backward, clipped AdamW update."""

    def __init__(self, model, handle: SurgeryHandle, cfg: HealConfig, params: dict[str, torch.nn.Parameter],
                 source: str | None = None):
        self.model, self.handle, self.cfg, self.params = model, handle, cfg, params
        self.source = source or ("online" if cfg.teacher == "auto" else cfg.teacher)
        self.device = next(model.parameters()).device
        self.opt = torch.optim.AdamW(param_groups(params, fully_tuned(model), cfg), weight_decay=0.0)
        self.attn = AttnOutputs(model, handle) if cfg.attn_mse_weight > 0 else None
        self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    @torch.no_grad()
    def teacher_targets(self, ids: torch.Tensor) -> torch.Tensor | TeacherLogits:
        """Full teacher logits ("online") or top-k log-probs at the temperature ("cached")."""
        with teacher_mode(self.model, self.handle), torch.autocast(**self.autocast):
            logits = self.model(ids.to(self.device)).logits
        if self.source == "cached":
            return topk_of(logits / self.cfg.temperature, self.cfg.top_k)
        return logits

    def loss_and_backward(self, ids: torch.Tensor, teacher=None, scale: float = 1.0) -> float:
        """Backward of ``scale`` x loss on one micro-batch; the teacher runs now when not given."""
        ids = ids.to(self.device)
        if teacher is None:
            teacher = self.teacher_targets(ids)
        with torch.autocast(**self.autocast):
            logits = self.model(ids).logits
        loss = kd_loss(logits, teacher, self.cfg.temperature)
        if self.cfg.ce_weight:
            loss = loss + self.cfg.ce_weight * torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        if self.attn is not None:
            loss = loss + self.cfg.attn_mse_weight * self.attn.loss()
        (loss * scale).backward()
        return loss.item()

    def optimizer_step(self, lr_scale: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * lr_scale
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def close(self) -> None:
        if self.attn is not None:
            self.attn.close()


def heal(model, handle: SurgeryHandle, blocks: torch.Tensor, cfg: HealConfig, out_dir: str | Path | None,
         resume: bool = True, progress: bool = True, stop_after_steps: int | None = None,
         evaluator: Callable[[], dict] | None = None) -> HealState:
    """Distil ``model`` (plan applied via ``handle``, adapters injected) on ``blocks`` [N, T].

    Checkpoints go to ``out_dir/checkpoints`` (``None``: no checkpoints, e.g. a brief heal in a
    search trial). ``evaluator`` (held-out quality as a dict) runs every ``cfg.eval_tokens``; its
    time is not counted in the healing seconds.
    """
    params = trainable_parameters(model)
    step = HealStep(model, handle, cfg, params, source=cfg.teacher_source(blocks.numel()))
    step_tokens = cfg.batch_size * cfg.grad_accum * blocks.shape[1]
    total_steps = max(1, cfg.tokens // step_tokens)
    ckpt = Checkpoints(Path(out_dir) / "checkpoints") if out_dir is not None else None
    state = (ckpt.load(params, step.opt, cfg) if resume and ckpt else None) or HealState()
    every = max(1, cfg.checkpoint_tokens // step_tokens)
    eval_every = max(1, cfg.eval_tokens // step_tokens) if cfg.eval_tokens and evaluator else 0
    start = time.perf_counter() - state.seconds
    cache = None
    if step.source == "cached" and state.step < total_steps:
        cache = TeacherCache(blocks, blocks_used(total_steps, len(blocks), cfg), step.teacher_targets, cfg,
                             step.device, progress)
    bar = tqdm(total=total_steps, initial=state.step, desc="healing", unit="step", disable=not progress)
    try:
        while state.step < total_steps:
            if stop_after_steps is not None and state.step >= stop_after_steps:
                break
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                idx = batch_indices(state.step, micro, len(blocks), cfg.batch_size, cfg.grad_accum, cfg.seed)
                teacher = cache.get(idx, step.device) if cache is not None else None
                loss_sum += step.loss_and_backward(blocks[idx], teacher, 1 / cfg.grad_accum) / cfg.grad_accum
            first = state.losses[0] if state.losses else loss_sum
            if not math.isfinite(loss_sum) or loss_sum > cfg.divergence_factor * max(first, 1e-3):
                last = ckpt.latest() if ckpt else None
                raise LBSearchError(f"healing stopped at step {state.step}: loss {loss_sum:.4g} "
                                    f"(first {first:.4g}); last good checkpoint: "
                                    f"{ckpt.folder / last if last else 'none'}")
            step.optimizer_step(lr_factor(state.step, total_steps, cfg.warmup_fraction))
            state.step += 1
            state.tokens += step_tokens
            state.losses.append(loss_sum)
            state.seconds = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{state.tokens / max(state.seconds, 1e-9):.0f}",
                            refresh=False)
            bar.update()
            if eval_every and state.step % eval_every == 0:
                state.evals.append({"tokens": state.tokens, "quality": evaluator()})
                start = time.perf_counter() - state.seconds  # evaluation time is not healing time
            if ckpt and (state.step % every == 0 or state.step == total_steps):
                ckpt.save(params, step.opt, state, cfg)
    finally:
        bar.close()
        step.close()
    for p in params.values():
        p.requires_grad_(False)
    return state
