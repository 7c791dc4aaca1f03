"""Export: healed results on disk, and back.

A healed folder holds the plan, the trained tensors (new attention parameters + LoRA) and a
report; loading it onto a fresh teacher reproduces the healed model's logits.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file

from .distill.healing import add_lora, trainable_parameters
from .errors import LBSearchError
from .io import atomic_write_json, save_tensors
from .plan import Plan
from .recipe import HealConfig
from .surgery import SurgeryHandle, apply_plan


def save_healed(model, plan: Plan, cfg: HealConfig, out_dir: str | Path, report: dict | None = None) -> Path:
    out = Path(out_dir)
    params = trainable_parameters(model)
    save_tensors(out / "weights.safetensors", params, metadata={"plan": str(plan)})
    for p in params.values():
        p.requires_grad_(False)
    plan.save(out / "plan.json")
    atomic_write_json(out / "heal.json", {"plan": str(plan), "plan_key": plan.key, "config": asdict(cfg),
                                          "report": report or {}})
    return out


def load_healed(model, path: str | Path) -> SurgeryHandle:
    """Apply a healed plan with its adapters and trained tensors to a freshly loaded teacher."""
    path = Path(path)
    for name in ("plan.json", "heal.json", "weights.safetensors"):
        if not (path / name).is_file():
            raise LBSearchError(f"{path}: not a healed model folder (missing {name})")
    plan = Plan.load(path / "plan.json")
    cfg = HealConfig(**json.loads((path / "heal.json").read_text())["config"])
    handle = apply_plan(model, plan)
    add_lora(model, cfg)
    tensors = load_file(str(path / "weights.safetensors"))
    params = trainable_parameters(model)
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise LBSearchError(f"{path}/weights.safetensors: missing {len(missing)} tensors (e.g. {missing[0]})")
    for name, p in params.items():
        p.data.copy_(tensors[name].to(p.device, p.dtype))
        p.requires_grad_(False)
    return handle
