"""Shared fixtures. Tests never touch the network; the chapter's data is read from ../shared/data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CHAPTER_DATA = SHARED_DATA / "instruction-data.json"


@pytest.fixture(scope="session")
def chapter_data_path() -> Path:
    if not CHAPTER_DATA.exists():
        pytest.skip(f"{CHAPTER_DATA} not found (the chapter's data sits in ../shared/data beside the repo)")
    return CHAPTER_DATA


@pytest.fixture(scope="session")
def gpt2():
    from instructkit.models.tokenizer import gpt2_tokenizer

    return gpt2_tokenizer()


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m instructkit ...` in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "instructkit", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )
