"""The package's layers: a module imports only from its own layer or the ones below it.

    config storage seeding viz monitoring redaction logs  <  models  <  data  <  eval  <  train  <  stages
        <  workflow  <  cli demo services
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "tokenflow"
LAYERS = {"config": 0, "storage": 0, "seeding": 0, "viz": 0, "monitoring": 0, "redaction": 0, "logs": 0, "models": 1,
          "data": 2, "eval": 3, "train": 4, "stages": 5, "workflow": 6, "cli": 7, "demo": 7, "services": 7}


def _layer(module: str) -> int:
    """The layer of ``tokenflow.<part>...``."""
    return LAYERS[module.split(".")[1]]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, project module) of every import in a file, at module level or inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "tokenflow" else [f"tokenflow.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out += [(node.lineno, name) for name in names if name.startswith("tokenflow.")]
    return out


def test_every_top_level_part_of_the_package_has_a_layer():
    parts = {p.stem for p in PACKAGE.iterdir() if (p.suffix == ".py" or p.is_dir()) and not p.name.startswith("_")}
    assert parts == set(LAYERS)


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = "tokenflow." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if module == "tokenflow.__init__":
            continue
        for line, name in _imports(path):
            if _layer(name) > _layer(module):
                upward.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from tokenflow.workflow.runner import plan\n")
    assert [(line, name) for line, name in _imports(bad) if _layer(name) > LAYERS["eval"]] == [
        (2, "tokenflow.workflow.runner")]
