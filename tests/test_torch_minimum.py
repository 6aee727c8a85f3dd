"""The minimum torch the package states is the one it checks, and it refuses an older one with one
line. (`make test-min-torch` runs the core tests on that minimum, torch 2.5.1, in a venv of its own:
a multi-GB CUDA wheel from PyPI, so not part of `make test`.)"""

import re
import subprocess
import sys

from instructkit.cli import MIN_TORCH

from .conftest import REPO


def test_pyproject_states_the_minimum_the_cli_checks():
    pyproject = (REPO / "pyproject.toml").read_text()
    stated = re.search(r'"torch>=(\d+)\.(\d+)"', pyproject)
    assert stated and (int(stated.group(1)), int(stated.group(2))) == MIN_TORCH
    assert f"torch=={MIN_TORCH[0]}.{MIN_TORCH[1]}" in (REPO / "Makefile").read_text()


def test_an_older_torch_is_refused_with_one_line():
    code = ("import torch; torch.__version__ = '2.4.1+cpu'; import sys; from instructkit.cli import main; "
            "sys.exit(main(['data', '--data', 'builtin:30']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("instructkit: error: torch 2.4.1+cpu is too old: instructkit needs 2.5 or newer "
                                     "(grouped-query attention in scaled_dot_product_attention); `pip install 'torch>=2.5'`")
