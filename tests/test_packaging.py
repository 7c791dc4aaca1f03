"""The installed package (not only the editable checkout) holds every subpackage and data file."""
import importlib.metadata
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {name: REPO / path for name, path in tool["package-dir"].items()}
    found = set()
    for name, root in roots.items():
        for init in root.rglob("__init__.py"):
            parts = init.parent.relative_to(root).parts
            if "__pycache__" not in parts:
                found.add(".".join((name, *parts)))
    assert found <= set(tool["packages"]), f"missing from [tool.setuptools] packages: {sorted(found - set(tool['packages']))}"
    assert (REPO / "lbsearch" / "cost_tables").is_dir() and list((REPO / "search_spaces").glob("*.yaml"))


def _run_from_checkout(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` with the checkout's root first on sys.path, as ``python -m`` from it puts it."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_checkout_root_on_path_does_not_shadow_installed_kernels_package():
    """transformers imports Hugging Face's ``kernels``; the checkout's ``kernels/`` folder must not answer."""
    installed = importlib.metadata.packages_distributions().get("kernels")
    if importlib.util.find_spec("kernels") is None or installed is None:
        pytest.skip("Hugging Face kernels is not installed")
    code = ("import sys, kernels, lbsearch.kernels.lswa\n"
            "assert 'site-packages' in kernels.__file__ or 'dist-packages' in kernels.__file__, kernels.__file__\n"
            "import transformers.integrations.hub_kernels\n"
            "print(kernels.__file__)")
    done = _run_from_checkout(code)
    assert done.returncode == 0, done.stderr[-2000:]


def test_checkout_kernels_folder_is_importable_alone():
    """Without an installed namesake the folder stays importable as the top-level ``kernels``."""
    code = ("import sys\n"
            "sys.path[:] = [p for p in sys.path if 'site-packages' not in p and 'dist-packages' not in p]\n"
            "sys.path.insert(0, '.')\n"
            "import kernels\n"
            "assert kernels.__file__.endswith('kernels/__init__.py') and 'site-packages' not in kernels.__file__\n")
    done = _run_from_checkout(code)
    assert done.returncode == 0, done.stderr[-2000:]
