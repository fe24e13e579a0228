"""The tree passes ruff with the project's configuration (pyproject.toml [tool.ruff])."""

import subprocess
import sys

from helpers import REPO


def test_ruff_passes():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-1000:]
