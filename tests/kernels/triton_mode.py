"""Where kernel tests run: compiled Triton kernels on a GPU, the Triton interpreter on CPU.

Import it before any Triton kernel module: Triton reads ``TRITON_INTERPRET`` when a kernel is
defined. ``TRITON_INTERPRET`` in the environment wins (``=1`` interprets on a GPU machine too).
A test module that imports ``pytestmark`` from here is marked ``gpu`` when it runs compiled on
CUDA, so ``pytest -m gpu`` on the device runs the compiled kernels against their references.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []
