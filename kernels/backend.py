"""Which implementation of an op runs: "torch" (its naive reference), "triton", or "auto".

Shared by every op folder's ``ops.py``: ``backend`` wins, then the op's environment variable, then
"auto" (Triton when the tensors are on CUDA and Triton imports, else torch).
"""
from __future__ import annotations

import os

import torch

NAMES = ("torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(op: str, env_var: str, backend: str | None, device: torch.device) -> str:
    """The backend name for ``op`` on tensors on ``device``; a ValueError names the allowed ones."""
    name = (backend or os.environ.get(env_var) or "auto").lower()
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_available() else "torch"
    if name not in NAMES:
        raise ValueError(f"unknown {op} backend {name!r}; choose from auto, {', '.join(NAMES)}")
    return name
