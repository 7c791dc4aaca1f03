"""Healed folders: a healed plan's trained tensors (new attention parameters + LoRA or fully tuned
weights), its plan
and a report (``save_healed``); ``load_healed`` puts them back onto a freshly loaded teacher.
Export turns them into deployable models (:mod:`lbsearch.export`)."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file

from ..errors import LBSearchError
from ..io import atomic_write_json, save_tensors
from ..plan import Plan
from ..recipe import HealConfig
from ..surgery import SurgeryHandle, apply_plan
from .healing import trainable_parameters
from .tuning import add_tuning

HEALED_FILES = ("plan.json", "heal.json", "weights.safetensors")


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


def is_healed_folder(path: str | Path) -> bool:
    return all((Path(path) / name).is_file() for name in HEALED_FILES)


def load_healed(model, path: str | Path) -> SurgeryHandle:
    """Apply a healed plan with its adapters and trained tensors to a freshly loaded teacher."""
    path = Path(path)
    for name in HEALED_FILES:
        if not (path / name).is_file():
            raise LBSearchError(f"{path}: not a healed model folder (missing {name})")
    plan = Plan.load(path / "plan.json")
    cfg = HealConfig(**json.loads((path / "heal.json").read_text())["config"])
    handle = apply_plan(model, plan)
    add_tuning(model, cfg)
    tensors = load_file(str(path / "weights.safetensors"))
    params = trainable_parameters(model)
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise LBSearchError(f"{path}/weights.safetensors: missing {len(missing)} tensors (e.g. {missing[0]})")
    for name, p in params.items():
        p.data.copy_(tensors[name].to(p.device, p.dtype))
        p.requires_grad_(False)
    return handle
