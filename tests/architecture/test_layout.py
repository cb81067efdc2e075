"""The house rules of the layout (docs/architecture.md), checked so that they stay true:
no import circle among engine, kernels and export (imports inside functions count, those under
`if TYPE_CHECKING:` do not), at most 10 top-level modules in engine/, small modules, and the
public names and `python -m` entry points where users call them."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from import_graph import cycles, import_graph, module_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MAX_ENGINE_MODULES = 10
MAX_MODULE_LINES = 420  # "about 400": the bound, with a little slack for docstrings
ENTRY_POINTS = ("engine.train", "engine.sample", "engine.evaluate", "engine.plot",
                "engine.anomaly", "engine.serve", "engine.crystal.evaluate", "export.onnx",
                "export.aoti", "export.tensorrt", "export.triton")


def test_no_import_cycles():
    found = cycles(import_graph(ROOT))
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """A circle hidden in a function body and closed through a relative import is found;
    the same edge under TYPE_CHECKING, and a child importing its parent package, are not."""
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from pkg.b import g\n",
        "pkg/b.py": "from . import c\n",
        "pkg/c.py": "import pkg.a\n",
        "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n",
        "pkg/e.py": "from pkg import d\n",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.b"] == {"pkg.c"} and graph["pkg.d"] == set()
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_from_package_import_name_points_at_the_package(tmp_path):
    """`from pkg import name` where name is not a module is an edge to pkg's __init__."""
    _write(tmp_path, {"pkg/__init__.py": "from pkg.a import x\n", "pkg/a.py": "x = 1\n",
                      "pkg/b.py": "from pkg import x\n"})
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.b"] == {"pkg"} and graph["pkg"] == {"pkg.a"}
    assert cycles(graph) == []


def test_engine_has_few_top_level_modules_and_a_runtime_package():
    top = sorted(p.name for p in (ROOT / "engine").glob("*.py"))
    assert len(top) <= MAX_ENGINE_MODULES, f"engine/ holds {len(top)} modules: {top}"
    assert (ROOT / "engine" / "runtime" / "__init__.py").is_file()
    assert not list((ROOT / "engine").glob("runtime_*.py"))


def test_modules_stay_small():
    big = {name: n for name, path in module_files(ROOT).items()
           if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_entry_points_have_main(module):
    mod = importlib.import_module(module)
    assert callable(mod.main)
    assert 'if __name__ == "__main__":' in Path(mod.__file__).read_text()


def test_public_names():
    from engine.models import build_model
    from engine.runtime import Sampler

    assert callable(Sampler.load) and build_model("mlp", hidden_dims=(8,), latent_dim=2)
