"""lbsearch: choose softmax, linear sliding-window or no attention per layer, and search the choice."""
from .errors import LBSearchError
from .models import load_teacher, load_tokenizer
from .plan import LayerSpec, Plan
from .surgery import apply_plan, plan_cache

__all__ = ["LBSearchError", "LayerSpec", "Plan", "apply_plan", "load_teacher", "load_tokenizer", "plan_cache"]
__version__ = "0.1.0"
