"""lbsearch: choose softmax, linear sliding-window or no attention per layer, and search the choice."""


def _map_checkout_folders() -> None:
    """Import guard for a source checkout imported ahead of the installed package (``ray job submit
    --working-dir .`` puts the uploaded repository first on the job's PYTHONPATH): pyproject maps
    the top-level ``kernels/`` and ``search_spaces/`` folders to ``lbsearch.kernels`` and
    ``lbsearch.search_spaces`` only when it installs, so a checkout maps them here, from beside
    this very package. An installed package holds both folders and is left alone."""
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    for name in ("kernels", "search_spaces"):
        init, full = here.parent / name / "__init__.py", f"{__name__}.{name}"
        if full in sys.modules or (here / name).is_dir() or not init.is_file():
            continue
        spec = importlib.util.spec_from_file_location(full, init, submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[full]
            raise
        globals()[name] = module


_map_checkout_folders()

from .errors import LBSearchError
from .export import load_model
from .models import load_teacher, load_tokenizer
from .plan import LayerSpec, Plan
from .surgery import apply_plan, plan_cache

__all__ = ["LBSearchError", "LayerSpec", "Plan", "apply_plan", "code_version", "load_model", "load_teacher",
           "load_tokenizer", "plan_cache"]
__version__ = "0.1.0"


def code_version() -> str:
    """The package version, plus the git commit (and "+dirty") when running from a checkout."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+{commit}{'.dirty' if dirty else ''}" if commit else __version__
