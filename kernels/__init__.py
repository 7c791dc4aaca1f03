"""Triton kernels with PyTorch references; installed as ``lbsearch.kernels``.

With a checkout's root on ``sys.path`` (``python -m`` run from it, a Ray job's working dir) this
folder is also importable as the top-level ``kernels``: the import name of Hugging Face's kernels
package, which transformers imports. Imported under that name, it hands the name to the installed
package, so transformers gets what it asked for.
"""


def _hand_name_to_installed_package() -> None:
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    path = [p for p in sys.path if Path(p or ".").resolve() != root]
    spec = importlib.machinery.PathFinder.find_spec(__name__, path)
    if spec is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[__name__] = module  # what ``import kernels`` returns once this body has run
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _hand_name_to_installed_package()
