"""The installed package (not only the editable checkout) holds every subpackage and data file."""
import tomllib
from pathlib import Path

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
