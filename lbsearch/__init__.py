"""lbsearch: choose softmax, linear sliding-window or no attention per layer, and search the choice."""
from .errors import LBSearchError
from .models import load_teacher, load_tokenizer
from .plan import LayerSpec, Plan
from .surgery import apply_plan, plan_cache

__all__ = ["LBSearchError", "LayerSpec", "Plan", "apply_plan", "code_version", "load_teacher", "load_tokenizer",
           "plan_cache"]
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
