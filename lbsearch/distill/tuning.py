"""What healing trains besides the new attention parameters (``HealConfig.tune``): LoRA adapters
on the projections, or the projections' weights themselves ("full").

The teacher stays reachable either way, because healing distils from the same model with the
plan suspended: adapters switch off; fully tuned weights are trained in fresh copies while the
original tensors wait aside, and :func:`teacher_weights` swaps them in (a pointer swap, no copy).
The original tensors are never written, so removing the tuning gives back the teacher exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from ..recipe import HealConfig

ORIGINALS = "_lbsearch_originals"  # model attribute: [(parameter, original tensor)] of full tuning


def add_tuning(model: nn.Module, cfg: HealConfig) -> None:
    """Prepare the projections still in ``model`` for training as ``cfg.tune`` says."""
    if cfg.tune == "full":
        _add_full(model, cfg)
    else:
        add_lora(model, cfg)


def remove_tuning(model: nn.Module) -> int:
    """Undo :func:`add_tuning`; returns how many modules or weights were given back."""
    return remove_lora(model) + _remove_full(model)


def add_lora(model: nn.Module, cfg: HealConfig) -> None:
    """Inject LoRA adapters (peft) into the attention (and optionally MLP) projections."""
    if cfg.lora_rank <= 0:
        return
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                        target_modules=cfg.lora_targets(), bias="none")
    torch.manual_seed(cfg.seed)
    inject_adapter_in_model(config, model)


def remove_lora(model: nn.Module) -> int:
    """Every adapter-wrapped projection goes back to its original module (unchanged weights)."""
    wrapped = [(name, m) for name, m in model.named_modules() if _is_tuner(m)]
    for name, module in wrapped:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    if "peft_config" in vars(model):
        del model.peft_config
    return len(wrapped)


def tuner_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if _is_tuner(m)]


def _is_tuner(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def _add_full(model: nn.Module, cfg: HealConfig) -> None:
    """The targeted projections' weights and biases train in copies; the originals wait aside."""
    if getattr(model, ORIGINALS, None):
        raise RuntimeError("the model's weights are already being tuned; remove_tuning first")
    targets = set(cfg.lora_targets())
    originals = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name.rpartition(".")[2] in targets:
            for p in module.parameters(recurse=False):
                originals.append((p, p.data))
                p.data = p.data.clone()
    setattr(model, ORIGINALS, originals)


def _remove_full(model: nn.Module) -> int:
    originals = vars(model).pop(ORIGINALS, None) or []
    for p, original in originals:
        p.data = original
    return len(originals)


def fully_tuned(model: nn.Module) -> set[int]:
    """``id`` of every parameter trained in full (empty without full tuning)."""
    return {id(p) for p, _ in getattr(model, ORIGINALS, None) or []}


class teacher_weights:
    """Context: fully tuned weights swapped for their originals (nothing to do without full tuning)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def _swap(self) -> None:
        originals = getattr(self.model, ORIGINALS, None) or []
        for i, (p, other) in enumerate(originals):
            originals[i] = (p, p.data)
            p.data = other

    def __enter__(self):
        self._swap()
        return self.model

    def __exit__(self, *exc):
        self._swap()
