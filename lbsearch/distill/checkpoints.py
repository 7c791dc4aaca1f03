"""Atomic, resumable healing checkpoints: trainable tensors + optimizer state + progress."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from ..errors import LBSearchError
from ..io import atomic_write_json, save_tensors

if TYPE_CHECKING:
    from ..recipe import HealConfig


@dataclass
class HealState:
    step: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    evals: list[dict] = field(default_factory=list)  # held-out quality along the run


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
