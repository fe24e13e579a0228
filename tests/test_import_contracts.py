"""The import contracts of pyproject.toml ([tool.importlinter]): they hold for the
tree, and they catch a forbidden import (checked on a copy with one added)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mimjax", "input_pipeline", "configs")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root))  # the copy shadows the installed tree
    command = "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"
    return subprocess.run([sys.executable, "-c", command, "--config",
                           str(root / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def _copy_tree(destination: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(REPO / package, destination / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", destination / "pyproject.toml")
    return destination


def test_the_tree_keeps_every_contract(tmp_path):
    result = _lint_imports(_copy_tree(tmp_path))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, forbidden, contract", [
    ("mimjax/models/vit.py", "from mimjax import train", "mimjax layers"),
    ("mimjax/objectives/mcr.py", "from mimjax.evaluators import retrieval",
     "models and objectives never import"),
    ("input_pipeline/transforms.py", "import mimjax.sharding", "input_pipeline never imports"),
    ("mimjax/evaluators/retrieval.py", "from mimjax import drivers", "mimjax layers"),
    ("input_pipeline/tfds_source.py", "import tensorflow", "no TensorFlow in the training path"),
])
def test_a_forbidden_import_breaks_a_contract(tmp_path, module, forbidden, contract):
    root = _copy_tree(tmp_path)
    with open(root / module, "a") as f:
        f.write(f"\n{forbidden}  # added by the test: must break a contract\n")
    result = _lint_imports(root)
    assert result.returncode != 0, result.stdout[-3000:]
    broken = [line for line in result.stdout.splitlines() if "BROKEN" in line]
    assert any(line.startswith(contract) for line in broken), result.stdout[-3000:]
