"""Global healing: distil the modified model from the teacher (the same weights with the plan and
adapters switched off), training only the new LSWA parameters and LoRA adapters.

Resumable: every ``checkpoint_tokens`` the trainable tensors, the optimizer state and the step go
to disk atomically; the data order and learning rate are pure functions of the step, so a resumed
run ends with the same parameters as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..errors import LBSearchError
from ..io import atomic_write_json, save_tensors
from ..surgery import SurgeryHandle, lswa_modules

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, kw_only=True)
class HealConfig:
    tokens: int = 65536
    batch_size: int = 4  # blocks per micro-batch
    grad_accum: int = 1
    lr: float = 1e-3  # LSWA parameters
    lora_lr: float = 2e-4
    warmup_fraction: float = 0.05
    temperature: float = 1.0
    ce_weight: float = 0.0
    attn_mse_weight: float = 0.0
    lora_rank: int = 16  # 0: no adapters
    lora_alpha: int = 32
    lora_mlp: bool = False
    checkpoint_tokens: int = 1_000_000
    max_grad_norm: float = 1.0
    divergence_factor: float = 10.0
    seed: int = 0

    def lora_targets(self) -> list[str]:
        return list(ATTN_TARGETS + (MLP_TARGETS if self.lora_mlp else ()))


@dataclass
class HealState:
    step: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def add_lora(model, cfg: HealConfig) -> None:
    """Inject LoRA adapters (peft) into the attention (and optionally MLP) projections still in the model."""
    if cfg.lora_rank <= 0:
        return
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                        target_modules=cfg.lora_targets(), bias="none")
    torch.manual_seed(cfg.seed)
    inject_adapter_in_model(config, model)


def _tuner_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    """New LSWA parameters and LoRA weights, by name; everything else is frozen."""
    model.requires_grad_(False)
    names = {}
    for idx, module in lswa_modules(model).items():
        for name, p in module.new_parameters().items():
            names[id(p)] = True
    params = {}
    for name, p in model.named_parameters():
        if id(p) in names or "lora_" in name:
            p.requires_grad_(True)
            params[name] = p
    return params


class teacher_mode:
    """Context: the plan suspended and adapters off, so the model is exactly the teacher."""

    def __init__(self, model, handle: SurgeryHandle):
        self.model, self.handle = model, handle

    def __enter__(self):
        self._suspend = self.handle.suspended()
        self._suspend.__enter__()
        for m in _tuner_layers(self.model):
            m.enable_adapters(False)
        return self.model

    def __exit__(self, *exc):
        for m in _tuner_layers(self.model):
            m.enable_adapters(True)
        self._suspend.__exit__(*exc)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean per-token KL(teacher || student) at ``temperature``, scaled by temperature^2."""
    s = torch.log_softmax(student.float() / temperature, -1)
    t = torch.log_softmax(teacher.float() / temperature, -1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature ** 2


def lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def batch_indices(step: int, micro: int, n_blocks: int, batch_size: int, grad_accum: int, seed: int) -> torch.Tensor:
    """Blocks of a micro-batch: a seeded permutation per epoch, a pure function of the step."""
    first = (step * grad_accum + micro) * batch_size
    idx = []
    for pos in range(first, first + batch_size):
        epoch, offset = divmod(pos, n_blocks)
        perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        idx.append(int(perm[offset]))
    return torch.tensor(idx)


class AttnOutputs:
    """Collects attention outputs of the LSWA layers (student) and of their originals (teacher)."""

    def __init__(self, model, handle: SurgeryHandle):
        self.student, self.teacher, self.hooks = {}, {}, []
        for idx, module in lswa_modules(model).items():
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


class Checkpoints:
    """``ckpt-<step>.safetensors`` + ``.json`` in a folder, with ``latest.json`` pointing at the newest."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def save(self, params: dict, opt: torch.optim.Optimizer, state: HealState, cfg: HealConfig) -> Path:
        tensors = {f"param.{k}": v.detach() for k, v in params.items()}
        names = list(params)
        for i, pstate in opt.state_dict()["state"].items():
            for k, v in pstate.items():
                tensors[f"opt.{names[i]}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        stem = f"ckpt-{state.step:08d}"
        save_tensors(self.folder / f"{stem}.safetensors", tensors)
        atomic_write_json(self.folder / f"{stem}.json", {"state": asdict(state), "config": asdict(cfg)})
        atomic_write_json(self.folder / "latest.json", {"stem": stem})
        for old in sorted(self.folder.glob("ckpt-*.json"))[:-2]:  # keep the last two
            old.with_suffix(".safetensors").unlink(missing_ok=True)
            old.unlink(missing_ok=True)
        return self.folder / f"{stem}.safetensors"

    def latest(self) -> str | None:
        pointer = self.folder / "latest.json"
        return json.loads(pointer.read_text())["stem"] if pointer.is_file() else None

    def load(self, params: dict, opt: torch.optim.Optimizer, cfg: HealConfig) -> HealState | None:
        stem = self.latest()
        if stem is None:
            return None
        meta = json.loads((self.folder / f"{stem}.json").read_text())
        if meta["config"] != asdict(cfg):
            raise LBSearchError(f"{self.folder}: checkpoint was made with another healing config; "
                                "use a new --out or delete the checkpoints")
        tensors = load_file(str(self.folder / f"{stem}.safetensors"))
        for name, p in params.items():
            p.data.copy_(tensors[f"param.{name}"])
        opt_state = opt.state_dict()
        names = list(params)
        for i, name in enumerate(names):
            keys = [k for k in tensors if k.startswith(f"opt.{name}.")]
            if keys:
                opt_state["state"][i] = {k[len(f"opt.{name}."):]: tensors[k] for k in keys}
        opt.load_state_dict(opt_state)
        return HealState(**meta["state"])


def heal(model, handle: SurgeryHandle, blocks: torch.Tensor, cfg: HealConfig, out_dir: str | Path,
         resume: bool = True, progress: bool = True, stop_after_steps: int | None = None) -> HealState:
    """Distil ``model`` (plan applied via ``handle``, adapters injected) on ``blocks`` [N, T]."""
    device = next(model.parameters()).device
    params = trainable_parameters(model)
    new = [p for n, p in params.items() if "lora_" not in n]
    lora = [p for n, p in params.items() if "lora_" in n]
    groups = [{"params": new, "lr": cfg.lr, "base_lr": cfg.lr}]
    if lora:
        groups.append({"params": lora, "lr": cfg.lora_lr, "base_lr": cfg.lora_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    step_tokens = cfg.batch_size * cfg.grad_accum * blocks.shape[1]
    total_steps = max(1, cfg.tokens // step_tokens)
    ckpt = Checkpoints(Path(out_dir) / "checkpoints")
    state = (ckpt.load(params, opt, cfg) if resume else None) or HealState()
    every = max(1, cfg.checkpoint_tokens // step_tokens)
    attn = AttnOutputs(model, handle) if cfg.attn_mse_weight > 0 else None
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = tqdm(total=total_steps, initial=state.step, desc="healing", unit="step", disable=not progress)
    start = time.perf_counter() - state.seconds
    try:
        while state.step < total_steps:
            if stop_after_steps is not None and state.step >= stop_after_steps:
                break
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(state.step, total_steps, cfg.warmup_fraction)
            opt.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                idx = batch_indices(state.step, micro, len(blocks), cfg.batch_size, cfg.grad_accum, cfg.seed)
                ids = blocks[idx].to(device)
                with torch.no_grad(), teacher_mode(model, handle), torch.autocast(**autocast):
                    t_logits = model(ids).logits
                with torch.autocast(**autocast):
                    s_logits = model(ids).logits
                loss = kd_loss(s_logits, t_logits, cfg.temperature)
                if cfg.ce_weight:
                    loss = loss + cfg.ce_weight * torch.nn.functional.cross_entropy(
                        s_logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                if attn is not None:
                    loss = loss + cfg.attn_mse_weight * attn.loss()
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.item() / cfg.grad_accum
            first = state.losses[0] if state.losses else loss_sum
            if not math.isfinite(loss_sum) or loss_sum > cfg.divergence_factor * max(first, 1e-3):
                last = ckpt.latest()
                raise LBSearchError(f"healing stopped at step {state.step}: loss {loss_sum:.4g} "
                                    f"(first {first:.4g}); last good checkpoint: "
                                    f"{ckpt.folder / last if last else 'none'}")
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            opt.step()
            state.step += 1
            state.tokens += step_tokens
            state.losses.append(loss_sum)
            state.seconds = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{state.tokens / max(state.seconds, 1e-9):.0f}")
            bar.update()
            if state.step % every == 0 or state.step == total_steps:
                ckpt.save(params, opt, state, cfg)
    finally:
        bar.close()
        if attn is not None:
            attn.close()
    for p in params.values():
        p.requires_grad_(False)
    return state
